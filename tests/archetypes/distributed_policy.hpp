// A minimal distributed policy (docs/writing-a-distributed-policy.md shows this file, and the doc-snippet test checks
// the page against it): one process, with a log of what the trainer asks of it.
struct ExampleDistributed {
  std::vector<std::string> calls;  // what the trainer called, in order (once per kind)

  std::int64_t num_processes() const { return 1; }
  std::int64_t rank() const { return 0; }
  std::int64_t local_rank() const { return 0; }  // which GPU of the machine (bind_policies gives it to the device)

  // At the start of every run: make every process's model equal (broadcast), prepare gradient averaging.
  void prepare(torch::nn::Module&) { note("prepare"); }

  // Alive over one micro-batch's forward and backward; `update` is false on accumulation micro-steps (no averaging
  // needed). The trainer calls guard.arm(loss) right before backward; it is required (empty when there is nothing
  // to arm), so that a misspelled one is a compile error, not a run whose ranks never average.
  struct Guard {
    void arm(const torch::Tensor&) {}
  };
  Guard gradient_sync(bool update) {
    note(update ? "gradient_sync(update)" : "gradient_sync(accumulate)");
    return {};
  }

  // Collectives: metrics are summed over processes, eval outputs gathered, files written by rank 0 behind a barrier.
  void all_reduce_sum(std::span<double>) { note("all_reduce_sum"); }
  torch::Tensor gather(const torch::Tensor& tensor) { return tensor; }
  void barrier() { note("barrier"); }

  // Optional. Called by bind_policies with the trainer's device (a GPU backend would follow it).
  void bind_device(torch::Device) { note("bind_device"); }

 private:
  void note(const std::string& call) {
    if (std::find(calls.begin(), calls.end(), call) == calls.end()) calls.push_back(call);
  }
};
