#include "runtime/serve/socket_io.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>

namespace kiln::serve {

namespace {

bool addr_port(const sockaddr_storage& a, std::string& host, int& port) {
  char buf[INET6_ADDRSTRLEN] = {};
  if (a.ss_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(&a);
    inet_ntop(AF_INET, &in->sin_addr, buf, sizeof buf);
    port = ntohs(in->sin_port);
  } else if (a.ss_family == AF_INET6) {
    auto* in = reinterpret_cast<const sockaddr_in6*>(&a);
    inet_ntop(AF_INET6, &in->sin6_addr, buf, sizeof buf);
    port = ntohs(in->sin6_port);
  } else {
    return false;
  }
  host = buf;
  return true;
}

}  // namespace

int find_client_socket(const std::string& remote_addr, int remote_port, int local_port) {
  for (const auto& entry : std::filesystem::directory_iterator(
           "/proc/self/fd", std::filesystem::directory_options::skip_permission_denied)) {
    int fd = -1;
    try {
      fd = std::stoi(entry.path().filename().string());
    } catch (...) {
      continue;
    }
    sockaddr_storage peer{}, local{};
    socklen_t pl = sizeof peer, ll = sizeof local;
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &pl) != 0) continue;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &ll) != 0) continue;
    std::string ph, lh;
    int pp = -1, lp = -1;
    if (!addr_port(peer, ph, pp) || !addr_port(local, lh, lp)) continue;
    if (pp == remote_port && ph == remote_addr && lp == local_port) return fd;
  }
  return -1;
}

bool peer_closed(int fd) {
  char c;
  const ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

bool write_all(int fd, const std::string& data, int timeout_ms) {
  for (size_t at = 0; at < data.size();) {
    pollfd p{fd, POLLOUT, 0};
    const int ready = poll(&p, 1, timeout_ms);
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0 || (p.revents & (POLLERR | POLLNVAL))) return false;
    const ssize_t n = send(fd, data.data() + at, data.size() - at, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
    if (n <= 0) return false;
    at += size_t(n);
  }
  return true;
}

std::string http_chunk(const std::string& data) {
  char size[32];
  std::snprintf(size, sizeof size, "%zx\r\n", data.size());
  return size + data + "\r\n";
}

void finish_connection(int fd) {
  shutdown(fd, SHUT_WR);
  char sink[16384];
  size_t drained = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  while (drained < (1u << 20) && std::chrono::steady_clock::now() < until) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 20) <= 0) continue;
    const ssize_t n = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) break;
    if (n > 0) drained += size_t(n);
  }
}

void listen_socket_options(int sock) {
  int yes = 1;
  setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
}

void deepen_accept_queue(int sock) {
  listen(sock, SOMAXCONN);  // on a listening socket, listen() only changes the queue's length
}

std::string bind_failure(const std::string& host, int port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || !res)
    return "cannot resolve the address";
  std::string why = "in use or not permitted";
  const int sock = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
  if (sock >= 0) {
    listen_socket_options(sock);
    if (bind(sock, res->ai_addr, res->ai_addrlen) != 0)
      why = errno == EADDRINUSE ? "address already in use" : std::strerror(errno);
    close(sock);
  }
  freeaddrinfo(res);
  return why;
}

}  // namespace kiln::serve
