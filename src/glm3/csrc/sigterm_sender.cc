// glm3 signal helper: whether a SIGTERM came from the process itself, for the trainer's stop report.
//
// Why: while MindSpore runs a graph it swaps in its own SIGINT handler, which logs "receive KeyboardInterrupt"
// and sends the process a SIGTERM, so a Ctrl-C reaches Python as SIGTERM. Python's handlers get no siginfo;
// this wrapper around the SIGTERM handler Python installed records si_pid and then calls it, and a SIGTERM
// the process sent itself is the Ctrl-C that MindSpore passed on. The record is sticky: a launcher's SIGTERM
// that follows the Ctrl-C (DVC, msrun) may arrive before Python runs its handler, which then runs once.
#include <signal.h>
#include <unistd.h>

namespace {
volatile sig_atomic_t last_sender = 0;
volatile sig_atomic_t from_self = 0;
struct sigaction chained;

void on_sigterm(int signum, siginfo_t *info, void *context) {
  last_sender = info != nullptr ? info->si_pid : 0;
  if (info != nullptr && info->si_pid == getpid()) from_self = 1;
  if (chained.sa_flags & SA_SIGINFO) {
    if (chained.sa_sigaction != nullptr) chained.sa_sigaction(signum, info, context);
  } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
    chained.sa_handler(signum);
  }
}
}  // namespace

// Wrap the current SIGTERM handler (Python's); 0 on success.
extern "C" int glm3_watch_sigterm() {
  struct sigaction action = {};
  action.sa_sigaction = on_sigterm;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_SIGINFO | SA_RESTART;
  last_sender = 0;
  from_self = 0;
  return sigaction(SIGTERM, &action, &chained);
}

// Whether any SIGTERM since glm3_watch_sigterm came from the process itself (1) or not (0).
extern "C" int glm3_sigterm_from_self() { return from_self; }

// The pid that sent the last SIGTERM since glm3_watch_sigterm (0: none, or unknown).
extern "C" int glm3_last_sigterm_sender() { return last_sender; }
