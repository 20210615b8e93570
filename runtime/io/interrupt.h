#pragma once
// Cooperative interruption: SIGINT/SIGTERM set a flag that long loops poll, so the stage unwinds through its
// destructors (removing staging output) instead of dying half-way. A second signal terminates at once.
namespace kiln {

void install_interrupt_handlers();
bool interrupt_requested();
// Throws kiln::Interrupted if a signal arrived.
void check_interrupt();
// Clears the flag (chat uses Ctrl-C to stop one answer, not the program).
void clear_interrupt();

}  // namespace kiln
