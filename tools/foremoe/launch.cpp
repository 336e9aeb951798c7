// `foremoe launch`: starts N local ranks of one job and supervises them, as torchrun does on
// one node. Each rank runs in a process group of its own (so that stopping a rank reaches the
// processes it started, and a terminal's Ctrl-C reaches the launcher only, which forwards it
// once); a rank dies with SIGKILL if the launcher itself is killed (PR_SET_PDEATHSIG).
// The launcher waits in one poll() loop on a self-pipe (SIGCHLD, SIGINT, SIGTERM) and, with
// --prefix-output, on the ranks' stdout/stderr pipes.
// Being outside the terminal's foreground group, a rank that reads the terminal is stopped
// (SIGTTIN), and Ctrl-Z stops the launcher only: ranks are not meant to be interactive.
#include "tools/foremoe/launch.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/error.h"

extern char** environ;

namespace fm::cli {

namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kRankVariables[] = {"MASTER_ADDR",     "MASTER_PORT", "RANK",
                                          "WORLD_SIZE",      "LOCAL_RANK",  "LOCAL_WORLD_SIZE",
                                          "FOREMOE_LAUNCHED"};

// ---------------------------------------------------------------------------------------------
// Signals: the handlers write the signal number to a non-blocking self-pipe that the wait loop
// polls. Installed for the duration of one launch_local call, then the old actions come back.

int g_signal_pipe_write = -1;

extern "C" void on_launcher_signal(int sig) {
  const int saved = errno;
  const unsigned char byte = static_cast<unsigned char>(sig);
  [[maybe_unused]] const ssize_t n = write(g_signal_pipe_write, &byte, 1);
  errno = saved;
}

class SignalCapture {
 public:
  SignalCapture() {
    FM_CHECK(g_signal_pipe_write < 0, "launch: launch_local is already running in this process");
    FM_CHECK(pipe2(fds_, O_CLOEXEC | O_NONBLOCK) == 0, "launch: pipe: {}", std::strerror(errno));
    g_signal_pipe_write = fds_[1];
    struct sigaction action {};
    action.sa_handler = on_launcher_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    for (size_t i = 0; i < kSignals.size(); ++i) sigaction(kSignals[i], &action, &old_[i]);
  }
  ~SignalCapture() {
    for (size_t i = 0; i < kSignals.size(); ++i) sigaction(kSignals[i], &old_[i], nullptr);
    g_signal_pipe_write = -1;
    close(fds_[0]);
    close(fds_[1]);
  }
  SignalCapture(const SignalCapture&) = delete;
  SignalCapture& operator=(const SignalCapture&) = delete;

  int read_fd() const { return fds_[0]; }
  // The signals received since the last call, in order.
  std::vector<int> take() {
    std::vector<int> sigs;
    unsigned char buf[64];
    ssize_t n;
    while ((n = read(fds_[0], buf, sizeof buf)) > 0) sigs.insert(sigs.end(), buf, buf + n);
    return sigs;
  }

  static constexpr std::array<int, 3> kSignals = {SIGCHLD, SIGINT, SIGTERM};

 private:
  int fds_[2] = {-1, -1};
  std::array<struct sigaction, 3> old_{};
};

// ---------------------------------------------------------------------------------------------
// Rank output with --prefix-output: complete lines are written as "[rank r] line\n" with one
// write(), so lines of different ranks never interleave mid-line.

constexpr size_t kMaxLine = 64 * 1024;  // a longer line without '\n' is written in pieces

void write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the launcher's own output is gone; the ranks keep running
    done += static_cast<size_t>(n);
  }
}

struct RankStream {
  int fd = -1;      // read end of the rank's pipe; -1 when closed or not prefixing
  int out_fd = -1;  // the launcher's 1 or 2
  std::string pending;

  void emit_lines(const std::string& prefix, bool flush_partial) {
    size_t begin = 0;
    std::string text;
    for (size_t nl; (nl = pending.find('\n', begin)) != std::string::npos; begin = nl + 1)
      text += prefix + pending.substr(begin, nl + 1 - begin);
    pending.erase(0, begin);
    if (!pending.empty() && (flush_partial || pending.size() >= kMaxLine)) {
      text += prefix + pending + "\n";
      pending.clear();
    }
    if (!text.empty()) write_all(out_fd, text);
  }
  // Reads what the pipe holds now; at end of file (or with `final`) writes the partial line
  // and closes the pipe.
  void pump(const std::string& prefix, bool final) {
    if (fd < 0) return;
    char buf[16384];
    for (;;) {
      const ssize_t n = read(fd, buf, sizeof buf);
      if (n > 0) {
        pending.append(buf, static_cast<size_t>(n));
        emit_lines(prefix, false);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN && !final) return;
      break;  // end of file, or drained at the end (a process the rank left behind may hold it)
    }
    emit_lines(prefix, true);
    close(fd);
    fd = -1;
  }
};

// ---------------------------------------------------------------------------------------------
// Ranks.

struct Rank {
  int index = 0;
  pid_t pid = -1;
  bool running = false;
  int status = 0;  // exit status, 128 + signal for a signal death
  RankStream out, err;
};

// The exit status a shell reports for a wait() status.
int shell_status(int wstatus) {
  if (WIFEXITED(wstatus)) return WEXITSTATUS(wstatus);
  if (WIFSIGNALED(wstatus)) return 128 + WTERMSIG(wstatus);
  return 1;
}

// "status 3", or "status 137 (killed by signal 9, Killed)".
std::string describe_status(int wstatus) {
  const int status = shell_status(wstatus);
  if (!WIFSIGNALED(wstatus)) return fmt::format("status {}", status);
  return fmt::format("status {} (killed by signal {}, {})", status, WTERMSIG(wstatus),
                     strsignal(WTERMSIG(wstatus)));
}

// argv[0] as execve needs it: unchanged when it has a '/', else the first match on PATH.
std::string resolve_program(const std::string& name) {
  FM_CHECK(!name.empty(), "launch: the program name is empty");
  if (name.find('/') != std::string::npos) {
    FM_CHECK(access(name.c_str(), X_OK) == 0, "launch: cannot execute '{}': {}", name,
             std::strerror(errno));
    return name;
  }
  const char* path = std::getenv("PATH");
  const std::string dirs = path ? path : "/usr/local/bin:/usr/bin:/bin";
  size_t begin = 0;
  while (begin <= dirs.size()) {
    size_t end = dirs.find(':', begin);
    if (end == std::string::npos) end = dirs.size();
    const std::string dir = end > begin ? dirs.substr(begin, end - begin) : ".";
    const std::string candidate = dir + "/" + name;
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
    begin = end + 1;
  }
  throw Error(fmt::format("launch: '{}' not found on PATH", name));
}

bool is_rank_variable(const char* entry) {
  for (const char* name : kRankVariables) {
    const size_t len = std::strlen(name);
    if (std::strncmp(entry, name, len) == 0 && entry[len] == '=') return true;
  }
  return false;
}

// The launcher's environment without stale rank variables, plus this rank's.
std::vector<std::string> rank_environment(const LaunchOptions& o, int port, int rank,
                                          const std::string& omp_threads) {
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e)
    if (!is_rank_variable(*e)) env.emplace_back(*e);
  env.push_back("MASTER_ADDR=" + o.master_addr);
  env.push_back(fmt::format("MASTER_PORT={}", port));
  env.push_back(fmt::format("RANK={}", rank));
  env.push_back(fmt::format("WORLD_SIZE={}", o.nproc));
  env.push_back(fmt::format("LOCAL_RANK={}", rank));
  env.push_back(fmt::format("LOCAL_WORLD_SIZE={}", o.nproc));
  env.push_back("FOREMOE_LAUNCHED=1");
  if (!omp_threads.empty()) env.push_back("OMP_NUM_THREADS=" + omp_threads);
  return env;
}

std::vector<char*> c_strings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (std::string& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// Sends `sig` to every running rank's process group (the rank and what it started).
void signal_ranks(std::vector<Rank>& ranks, int sig) {
  for (Rank& r : ranks) {
    if (!r.running) continue;
    if (kill(-r.pid, sig) != 0) kill(r.pid, sig);
  }
}

// Forks rank `rank.index` running `program` with `args` and `env`; returns once it has exec'd.
// Throws (after reaping it) when it could not.
void start_rank(Rank& rank, const std::string& program, std::vector<char*>& args,
                std::vector<char*>& env, bool prefix_output) {
  int exec_error[2];
  FM_CHECK(pipe2(exec_error, O_CLOEXEC) == 0, "launch: pipe: {}", std::strerror(errno));
  int out[2] = {-1, -1}, err[2] = {-1, -1};
  if (prefix_output) {
    FM_CHECK(pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0, "launch: pipe: {}",
             std::strerror(errno));
  }
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid == 0) {
    // The child: async-signal-safe calls only until execve.
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    for (int sig : {SIGCHLD, SIGINT, SIGTERM}) sigaction(sig, &dfl, nullptr);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // the launcher died before prctl took effect
    if (prefix_output) {
      if (dup2(out[1], 1) < 0 || dup2(err[1], 2) < 0) _exit(127);
    }
    execve(program.c_str(), args.data(), env.data());
    const int e = errno;
    [[maybe_unused]] const ssize_t n = write(exec_error[1], &e, sizeof e);
    _exit(127);
  }
  const int fork_errno = errno;
  close(exec_error[1]);
  if (prefix_output) {
    close(out[1]);
    close(err[1]);
  }
  if (pid < 0) {
    close(exec_error[0]);
    if (prefix_output) {
      close(out[0]);
      close(err[0]);
    }
    throw Error(fmt::format("launch: fork for rank {}: {}", rank.index, std::strerror(fork_errno)));
  }
  setpgid(pid, pid);  // also done by the child; whichever runs first wins, the other is a no-op
  rank.pid = pid;
  rank.running = true;
  if (prefix_output) {
    rank.out.fd = out[0];
    rank.err.fd = err[0];
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    fcntl(err[0], F_SETFL, O_NONBLOCK);
  }
  int child_errno = 0;
  ssize_t n;
  do n = read(exec_error[0], &child_errno, sizeof child_errno);
  while (n < 0 && errno == EINTR);
  close(exec_error[0]);
  if (n > 0) {
    int wstatus;
    while (waitpid(pid, &wstatus, 0) < 0 && errno == EINTR) {
    }
    rank.running = false;
    throw Error(fmt::format("launch: cannot execute '{}' for rank {}: {}", program, rank.index,
                            std::strerror(child_errno)));
  }
}

// Why the launcher is stopping the ranks (the first reason wins).
enum class Stop { kNone, kRankFailed, kSignal, kTimeout };

void say(const std::string& message) {
  fmt::print(stderr, "foremoe launch: {}\n", message);
}

}  // namespace

int pick_free_port(const std::string& addr) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(addr.c_str(), "0", &hints, &found);
  FM_CHECK(rc == 0, "launch: --master-addr '{}': cannot resolve it: {}", addr, gai_strerror(rc));
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> list(found, freeaddrinfo);
  std::string why = "no address";
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      why = std::strerror(errno);
      continue;
    }
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) == 0) {
      close(fd);
      const uint16_t port = bound.ss_family == AF_INET6
                                ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                : reinterpret_cast<sockaddr_in*>(&bound)->sin_port;
      return ntohs(port);
    }
    why = std::strerror(errno);
    close(fd);
  }
  throw Error(fmt::format("launch: cannot bind a TCP port on --master-addr '{}': {}", addr, why));
}

int launch_local(const LaunchOptions& o, const std::vector<std::string>& argv) {
  FM_CHECK(o.nproc >= 1, "launch: --nproc must be at least 1, got {}", o.nproc);
  FM_CHECK(o.master_port >= 0 && o.master_port <= 65535,
           "launch: --master-port must be in 0..65535 (0: pick a free port), got {}",
           o.master_port);
  FM_CHECK(o.timeout_s >= 0, "launch: --timeout-s must be >= 0 (0: no limit), got {}", o.timeout_s);
  FM_CHECK(o.grace_s >= 0, "launch: --grace-s must be >= 0, got {}", o.grace_s);
  FM_CHECK(!o.master_addr.empty(), "launch: --master-addr is empty");
  FM_CHECK(!argv.empty(),
           "launch: no command to run: give one after --, e.g. "
           "`foremoe launch --nproc 2 -- train --config grpo_tiny`");

  const std::string program = resolve_program(argv[0]);
  const int port = o.master_port > 0 ? o.master_port : pick_free_port(o.master_addr);
  // N ranks each using every core would oversubscribe the CPU: share them unless told.
  std::string omp_threads;
  if (o.nproc > 1 && std::getenv("OMP_NUM_THREADS") == nullptr) {
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    omp_threads = std::to_string(std::max(1u, cores / static_cast<unsigned>(o.nproc)));
  }
  spdlog::info("launch: {} rank(s) of '{}' with MASTER_ADDR={} MASTER_PORT={}{}", o.nproc,
               fmt::join(argv, " "), o.master_addr, port,
               omp_threads.empty() ? "" : " OMP_NUM_THREADS=" + omp_threads);

  std::vector<std::string> args = argv;
  args[0] = program;
  std::vector<char*> c_args = c_strings(args);

  SignalCapture signals;
  std::vector<Rank> ranks(static_cast<size_t>(o.nproc));
  for (int r = 0; r < o.nproc; ++r) {
    Rank& rank = ranks[static_cast<size_t>(r)];
    rank.index = r;
    rank.out.out_fd = 1;
    rank.err.out_fd = 2;
    std::vector<std::string> env = rank_environment(o, port, r, omp_threads);
    std::vector<char*> c_env = c_strings(env);
    try {
      start_rank(rank, program, c_args, c_env, o.prefix_output);
    } catch (const Error&) {
      signal_ranks(ranks, SIGKILL);
      for (Rank& started : ranks) {
        int wstatus;
        while (started.running && waitpid(started.pid, &wstatus, 0) < 0 && errno == EINTR) {
        }
        started.out.pump("", true);
        started.err.pump("", true);
      }
      throw;
    }
  }

  // Durations are capped at 1e9 s (~31 years) so that time points cannot overflow.
  const auto after = [](double s) {
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(std::min(s, 1e9)));
  };
  const Clock::time_point deadline =
      o.timeout_s > 0 ? after(o.timeout_s) : Clock::time_point::max();
  Stop stop = Stop::kNone;
  int job_status = 0;
  bool killed = false;  // SIGKILL sent
  Clock::time_point kill_at = Clock::time_point::max();
  const auto count_running = [&] {
    return std::count_if(ranks.begin(), ranks.end(), [](const Rank& r) { return r.running; });
  };
  const auto begin_stop = [&](Stop why, int status, int sig) {
    stop = why;
    job_status = status;
    signal_ranks(ranks, sig);
    kill_at = after(o.grace_s);
  };
  const auto kill_all = [&] {
    signal_ranks(ranks, SIGKILL);
    killed = true;
  };

  while (count_running() > 0) {
    // Wait for a signal, rank output or the next deadline (at most 1 s, as a safety net).
    const Clock::time_point next = std::min(
        {stop == Stop::kNone ? deadline : Clock::time_point::max(),
         killed ? Clock::time_point::max() : kill_at, Clock::now() + std::chrono::seconds(1)});
    const auto wait_ms = std::chrono::ceil<std::chrono::milliseconds>(next - Clock::now()).count();
    std::vector<pollfd> fds = {{signals.read_fd(), POLLIN, 0}};
    std::vector<RankStream*> streams;
    for (Rank& r : ranks) {
      for (RankStream* s : {&r.out, &r.err}) {
        if (s->fd < 0) continue;
        fds.push_back({s->fd, POLLIN, 0});
        streams.push_back(s);
      }
    }
    if (poll(fds.data(), fds.size(), static_cast<int>(std::max<int64_t>(0, wait_ms))) < 0 &&
        errno != EINTR) {
      throw Error(fmt::format("launch: poll: {}", std::strerror(errno)));
    }
    for (size_t i = 0; i < streams.size(); ++i) {
      if (fds[i + 1].revents == 0) continue;
      const Rank& owner = *std::find_if(ranks.begin(), ranks.end(), [&](const Rank& r) {
        return &r.out == streams[i] || &r.err == streams[i];
      });
      streams[i]->pump(fmt::format("[rank {}] ", owner.index), false);
    }
    // Ranks that ended.
    for (Rank& r : ranks) {
      if (!r.running) continue;
      int wstatus = 0;
      const pid_t done = waitpid(r.pid, &wstatus, WNOHANG);
      if (done == 0 || (done < 0 && errno == EINTR)) continue;
      r.running = false;
      if (done < 0) wstatus = 1 << 8;  // ECHILD: reaped elsewhere, status unknown; a failure
      r.status = shell_status(wstatus);
      if (r.status != 0 && stop == Stop::kNone) {
        const bool others = count_running() > 0;
        say(fmt::format("rank {} exited with {}{}", r.index, describe_status(wstatus),
                        others ? "; stopping the other ranks" : ""));
        begin_stop(Stop::kRankFailed, r.status, SIGTERM);
      }
    }
    // SIGINT / SIGTERM to the launcher: forwarded; a second one kills.
    for (int sig : signals.take()) {
      if (sig != SIGINT && sig != SIGTERM) continue;
      if (count_running() == 0) break;
      if (stop == Stop::kNone) {
        say(fmt::format("received {}; forwarding it to the ranks (send it again to kill them)",
                        sig == SIGINT ? "SIGINT" : "SIGTERM"));
        begin_stop(Stop::kSignal, 128 + sig, sig);
      } else if (!killed) {
        say(fmt::format("received {} again; killing the ranks",
                        sig == SIGINT ? "SIGINT" : "SIGTERM"));
        kill_all();
      }
    }
    const Clock::time_point now = Clock::now();
    if (stop == Stop::kNone && now >= deadline && count_running() > 0) {
      say(fmt::format("timeout: the job ran longer than --timeout-s {}; stopping the ranks",
                      o.timeout_s));
      begin_stop(Stop::kTimeout, kLaunchTimeoutStatus, SIGTERM);
    }
    if (stop != Stop::kNone && !killed && now >= kill_at && count_running() > 0) {
      say(fmt::format("{} rank(s) still running {} s after being asked to stop; sending SIGKILL",
                      count_running(), o.grace_s));
      kill_all();
    }
  }
  for (Rank& r : ranks) {
    const std::string prefix = fmt::format("[rank {}] ", r.index);
    r.out.pump(prefix, true);
    r.err.pump(prefix, true);
  }
  return job_status;
}

// ---------------------------------------------------------------------------------------------
// The subcommands.

// The --log-level spelling (engine/log.h) of a spdlog level.
static std::string log_level_name(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace:
      return "trace";
    case spdlog::level::debug:
      return "debug";
    case spdlog::level::warn:
      return "warn";
    case spdlog::level::err:
    case spdlog::level::critical:
      return "error";
    case spdlog::level::off:
      return "off";
    default:
      return "info";
  }
}

Runner add_launch(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "launch", "Start N local ranks of a foremoe subcommand (torchrun-style environment)");
  cmd->footer(
      "Example: foremoe launch --nproc 2 -- train --config grpo_tiny\n"
      "Each rank gets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE\n"
      "and FOREMOE_LAUNCHED=1 (and OMP_NUM_THREADS = cores / N when unset). A failing rank stops\n"
      "the others and its status is the job's; SIGINT/SIGTERM are forwarded to the ranks.");
  auto o = std::make_shared<LaunchOptions>();
  auto command = std::make_shared<std::vector<std::string>>();
  cmd->add_option("-n,--nproc,--nproc-per-node", o->nproc, "number of ranks to start")->required();
  cmd->add_option("--master-addr", o->master_addr, "rendezvous address (MASTER_ADDR)")
      ->capture_default_str();
  cmd->add_option("--master-port", o->master_port,
                  "rendezvous port (MASTER_PORT); 0 picks a free one (it could be taken by "
                  "another process before rank 0 binds it)")
      ->capture_default_str();
  cmd->add_option("--timeout-s", o->timeout_s,
                  "stop the whole job after this many seconds, exit 124; 0: no limit")
      ->capture_default_str();
  cmd->add_option("--grace-s", o->grace_s,
                  "seconds between SIGTERM (or the forwarded signal) and SIGKILL when stopping")
      ->capture_default_str();
  cmd->add_flag("--prefix-output", o->prefix_output,
                "prefix each line of a rank's stdout/stderr with \"[rank r] \" (the ranks then "
                "write to pipes: C stdio buffers their output in blocks)");
  cmd->add_option("command", *command, "the foremoe subcommand and its arguments, after --");
  return [o, command] {
    FM_CHECK(!command->empty(),
             "launch: no command to run: give one after --, e.g. "
             "`foremoe launch --nproc 2 -- train --config grpo_tiny`");
    char self[PATH_MAX];
    const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    FM_CHECK(n > 0, "launch: cannot read /proc/self/exe: {}", std::strerror(errno));
    std::vector<std::string> argv = {std::string(self, static_cast<size_t>(n))};
    // The ranks log at the launcher's level (`foremoe --log-level debug launch ...`) unless the
    // command sets its own (`-- --log-level debug train ...`).
    const std::string level = log_level_name(spdlog::get_level());
    if (level != "info" && command->front().rfind("-", 0) != 0) {
      argv.insert(argv.end(), {"--log-level", level});
    }
    argv.insert(argv.end(), command->begin(), command->end());
    return launch_local(*o, argv);
  };
}

namespace {

struct SelftestArgs {
  int exit_rank = -1;
  int exit_code = 0;
  int exit_signal = 0;
  double exit_after_s = 0;
  double sleep_s = 0;
  bool ignore_sigterm = false;
};

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

}  // namespace

Runner add_launch_selftest(CLI::App& app) {
  auto* cmd = app.add_subcommand("launch-selftest", "A rank for testing `foremoe launch`");
  cmd->group("");  // hidden from --help
  auto a = std::make_shared<SelftestArgs>();
  cmd->add_option("--exit-rank", a->exit_rank, "the rank that exits with --exit-code/-signal");
  cmd->add_option("--exit-code", a->exit_code, "exit status of --exit-rank");
  cmd->add_option("--exit-signal", a->exit_signal, "signal --exit-rank kills itself with");
  cmd->add_option("--exit-after-s", a->exit_after_s, "seconds --exit-rank waits first");
  cmd->add_option("--sleep-s", a->sleep_s, "seconds the other ranks sleep before exiting 0");
  cmd->add_flag("--ignore-sigterm", a->ignore_sigterm, "the other ranks ignore SIGTERM");
  return [a] {
    const std::string rank = env_or("RANK", "unset");
    fmt::print(
        "rank={} world_size={} local_rank={} local_world_size={} master_addr={} master_port={} "
        "launched={} log_level={} pid={}\n",
        rank, env_or("WORLD_SIZE", "unset"), env_or("LOCAL_RANK", "unset"),
        env_or("LOCAL_WORLD_SIZE", "unset"), env_or("MASTER_ADDR", "unset"),
        env_or("MASTER_PORT", "unset"), env_or("FOREMOE_LAUNCHED", "unset"),
        log_level_name(spdlog::get_level()), getpid());
    std::fflush(stdout);
    const auto sleep = [](double s) {
      std::this_thread::sleep_for(std::chrono::duration<double>(s));
    };
    if (rank == std::to_string(a->exit_rank)) {
      sleep(a->exit_after_s);
      if (a->exit_signal > 0) {
        signal(a->exit_signal, SIG_DFL);
        raise(a->exit_signal);
      }
      return a->exit_code;
    }
    if (a->ignore_sigterm) signal(SIGTERM, SIG_IGN);
    sleep(a->sleep_s);
    return 0;
  };
}

}  // namespace fm::cli
