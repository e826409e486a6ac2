#pragma once
// The signals a cluster sends before it stops a job (SLURM: SIGTERM, or the one --signal=USR1@60 names; Kubernetes
// and torchrun's agent: SIGTERM). While a run is preemptible, their handler only records the signal; the trainer
// reads the record at update steps. The previous handlers are put back when the run ends, and a signal recorded but
// never acted on (it came after the last update step's vote: during the last evaluation, or in on_training_run_end)
// is raised again under them, so that it is not lost.
#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

namespace accelerated::detail {

// The last preemption signal received (0: none). A lock-free atomic, so the handler may write it.
inline std::atomic<int> preemption_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs a lock-free flag");

extern "C" inline void record_preemption_signal(int signal) { preemption_signal.store(signal, std::memory_order_relaxed); }

class PreemptionSignals {
 public:
  explicit PreemptionSignals(const std::vector<int>& signals) {
    preemption_signal.store(0);
    for (const int signal : signals) {
      struct sigaction action {};
      action.sa_handler = record_preemption_signal;
      sigemptyset(&action.sa_mask);
      action.sa_flags = SA_RESTART;  // a read or write in progress goes on; the step ends normally
      struct sigaction previous {};
      if (::sigaction(signal, &action, &previous) == 0) installed_.push_back({signal, previous});
    }
  }
  ~PreemptionSignals() {
    for (const auto& [signal, previous] : installed_) ::sigaction(signal, &previous, nullptr);
    // Not while an error ends the run: the error ends the process (exit code 1), as it would have without a signal.
    if (const int signal = preemption_signal.exchange(0); signal != 0 && std::uncaught_exceptions() == 0) {
      ::raise(signal);
    }
  }
  PreemptionSignals(const PreemptionSignals&) = delete;
  PreemptionSignals& operator=(const PreemptionSignals&) = delete;

  // The signal received since the run started, or 0.
  static int received() { return preemption_signal.load(std::memory_order_relaxed); }
  // The same, marked as acted on (the run was preempted): it is not raised again when the run ends.
  static int consume() { return preemption_signal.exchange(0); }

 private:
  struct Installed {
    int signal;
    struct sigaction previous;
  };
  std::vector<Installed> installed_;
};

inline std::string signal_name(int signal) {
  switch (signal) {
    case SIGTERM: return "SIGTERM";
    case SIGUSR1: return "SIGUSR1";
    case SIGUSR2: return "SIGUSR2";
    case SIGINT: return "SIGINT";
    case SIGHUP: return "SIGHUP";
    default: return "signal " + std::to_string(signal);
  }
}

// Under SLURM, puts the job back in the queue (`scontrol requeue $SLURM_JOB_ID`); says what happened.
inline std::string requeue_slurm_job() {
  const char* job = std::getenv("SLURM_JOB_ID");
  if (job == nullptr || *job == '\0') return "not requeued: SLURM_JOB_ID is not set (not under SLURM)";
  const std::string id = job;
  if (id.find_first_not_of("0123456789_") != std::string::npos) return "not requeued: SLURM_JOB_ID = '" + id + "'";
  const int status = std::system(("scontrol requeue " + id + " >/dev/null 2>&1").c_str());
  return status == 0 ? "SLURM job " + id + " requeued"
                     : "`scontrol requeue " + id + "` failed (status " + std::to_string(status) + ")";
}

}  // namespace accelerated::detail
