// A live progress line for a terminal: "step 3/250: old_log_prob (stage 3)  1.4 s |",
// redrawn every 200 ms by a thread of its own while a stage runs, and erased before a
// step's line is printed. Off a terminal it prints nothing (logs get plain lines only).
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

namespace fm::cli {

class ProgressLine {
 public:
  explicit ProgressLine(bool enabled) : enabled_(enabled) {
    if (enabled_) thread_ = std::thread([this] { run(); });
  }
  ~ProgressLine() {
    if (!enabled_) return;
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
    erase();
  }
  ProgressLine(const ProgressLine&) = delete;
  ProgressLine& operator=(const ProgressLine&) = delete;

  // A new unit of work (e.g. "step 3/250"); clears the stage list.
  void begin(std::string title) {
    if (!enabled_) return;
    std::lock_guard lock(mu_);
    title_ = std::move(title);
    text_ = title_;
    stages_ = 0;
    t0_ = std::chrono::steady_clock::now();
    active_ = true;
  }
  // A stage of the current unit starts.
  void stage(const char* name) {
    if (!enabled_) return;
    std::lock_guard lock(mu_);
    text_ = fmt::format("{}: {} (stage {})", title_, name, ++stages_);
    draw();
  }
  // The unit is over: the line is erased so that the caller's output replaces it.
  void end() {
    if (!enabled_) return;
    std::lock_guard lock(mu_);
    active_ = false;
    erase();
  }

 private:
  void run() {
    std::unique_lock lock(mu_);
    while (!stop_) {
      cv_.wait_for(lock, std::chrono::milliseconds(200));
      if (!stop_ && active_) draw();
    }
  }
  void draw() {  // mu_ held
    static constexpr char kSpin[] = {'|', '/', '-', '\\'};
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    fmt::print("\r\033[K{}  {:.1f} s {}", text_, s, kSpin[spin_++ % 4]);
    std::fflush(stdout);
  }
  void erase() {
    fmt::print("\r\033[K");
    std::fflush(stdout);
  }

  bool enabled_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
  bool stop_ = false, active_ = false;
  std::string title_, text_;
  int stages_ = 0;
  unsigned spin_ = 0;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace fm::cli
