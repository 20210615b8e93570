#pragma once
// What kiln serve does on a connection's socket itself, beside cpp-httplib: 0.11 neither hands a handler its socket
// nor says that the client left, and it ends a stream as soon as the client half-closes. Plain POSIX, no httplib.
#include <string>

namespace kiln::serve {

// The connection's socket: the descriptor whose peer and local addresses are the request's. -1 if none.
int find_client_socket(const std::string& remote_addr, int remote_port, int local_port);

// EOF (or an error) from the peer: a client that sent its request and then closed or half-closed. Pipelined bytes
// count as alive.
bool peer_closed(int fd);

// Writes all of `data`, waiting up to timeout_ms for the socket to take each part; false when the client is gone
// (reset, closed) or stalled past the timeout.
bool write_all(int fd, const std::string& data, int timeout_ms = 5000);

// One chunk of a chunked transfer encoding (empty data: the last chunk).
std::string http_chunk(const std::string& data);

// Ends the connection after a complete answer written on it: shuts the sending side, then reads what the client
// still sends for a moment (up to 1 MiB, 200 ms), since closing a socket with unread input makes the kernel send a
// reset, which can discard the answer before the client reads it.
void finish_connection(int fd);

// httplib's listening-socket options without its SO_REUSEPORT (which lets a second server bind the same port and
// take half its traffic): SO_REUSEADDR alone, so that a restart is possible while old connections sit in TIME_WAIT.
void listen_socket_options(int sock);

// Lets the kernel queue up to SOMAXCONN connections on a listening socket, not the 5 compiled into Debian's httplib:
// clients that connect while the model loads wait there (a full queue drops SYNs, and clients retry them only after
// 1, 3, 7... s).
void deepen_accept_queue(int sock);

// Why binding host:port fails, for the one-line error: "address already in use", or strerror of a probe's bind.
std::string bind_failure(const std::string& host, int port);

}  // namespace kiln::serve
