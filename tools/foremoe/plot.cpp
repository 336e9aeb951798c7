// `foremoe plot <run dir>`: PNG plots of a run's metrics.jsonl (reward, KL and
// entropy, stage timing, expert load, SFT loss). Checks the run directory and
// every JSON line here, then runs tools/plot_run.py (matplotlib, Agg) on it.
#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/wait.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/error.h"
#include "engine/files.h"
#include "tools/foremoe/commands.h"

#ifndef FOREMOE_SOURCE_DIR
#error "FOREMOE_SOURCE_DIR must name the source tree (tools/plot_run.py lives there)"
#endif

extern char** environ;

namespace fm::cli {

namespace {

struct PlotArgs {
  std::string run_dir;
  std::string out_dir;  // default: <run dir>/plots
  std::string python;   // default: $FOREMOE_PYTHON, else python3 on PATH, else /usr/bin/python3
};

// The script's exit code for "matplotlib not importable" (tools/plot_run.py).
constexpr int kScriptNoMatplotlib = 3;
constexpr const char* kMatplotlibPackage = "python3-matplotlib";

// Every non-blank line of `path` must be a JSON object; throws naming file and line.
void check_metrics_file(const std::string& path) {
  const std::string text = read_file(path);
  size_t begin = 0;
  for (int64_t line_no = 1; begin < text.size(); ++line_no) {
    size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    const std::string_view line(text.data() + begin, end - begin);
    begin = end + 1;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    nlohmann::json record;
    try {
      record = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      // e.what() reads "[json.exception...] parse error at line 1, column N: <reason>".
      const std::string what = e.what();
      const size_t colon = what.find(": ");
      throw Error(fmt::format("{}:{}: malformed JSON line at column {}: {}", path, line_no, e.byte,
                              colon == std::string::npos ? what : what.substr(colon + 2)));
    }
    FM_CHECK(record.is_object(), "{}:{}: expected a JSON object per line, got a JSON {}", path,
             line_no, record.type_name());
  }
}

// Runs argv[0] (searched on PATH) with `argv`; returns its exit status, 127 if it could not be
// started, 128 + signal if it was killed. `quiet` sends its stdout and stderr to /dev/null.
int run_process(const std::vector<std::string>& argv, bool quiet) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (quiet) {
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
  }
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return 127;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    FM_CHECK(errno == EINTR, "waiting for {}: {}", argv[0], std::strerror(errno));
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

// The first candidate interpreter that imports matplotlib; throws saying what is missing.
std::string find_python(const std::string& requested) {
  std::vector<std::string> candidates;
  if (!requested.empty()) {
    candidates.push_back(requested);
  } else if (const char* env = std::getenv("FOREMOE_PYTHON"); env != nullptr && *env != '\0') {
    candidates.push_back(env);
  } else {
    candidates = {"python3", "/usr/bin/python3"};
  }
  std::vector<std::string> without_matplotlib;
  for (const std::string& py : candidates) {
    const int rc = run_process({py, "-c", "import matplotlib"}, /*quiet=*/true);
    if (rc == 0) return py;
    if (rc != 127) without_matplotlib.push_back(py);
  }
  if (without_matplotlib.empty())
    throw Error(fmt::format(
        "foremoe plot needs Python 3 with matplotlib: no interpreter found (tried {}); install "
        "the Debian packages python3 and {} (apt-get install -y python3 {})",
        fmt::join(candidates, ", "), kMatplotlibPackage, kMatplotlibPackage));
  throw Error(fmt::format(
      "foremoe plot needs matplotlib: {} cannot import it; install the Debian package {} "
      "(apt-get install -y {}) or point --python / FOREMOE_PYTHON at a Python that has it",
      fmt::join(without_matplotlib, ", "), kMatplotlibPackage, kMatplotlibPackage));
}

int run_plot(const PlotArgs& a) {
  namespace fs = std::filesystem;
  FM_CHECK(fs::is_directory(a.run_dir), "{}: no such run directory", a.run_dir);
  const std::string metrics = (fs::path(a.run_dir) / "metrics.jsonl").string();
  FM_CHECK(fs::is_regular_file(metrics), "{}: no metrics file (is {} a foremoe run directory?)",
           metrics, a.run_dir);
  check_metrics_file(metrics);
  const std::string script = std::string(FOREMOE_SOURCE_DIR) + "/tools/plot_run.py";
  FM_CHECK(fs::is_regular_file(script), "{}: plotting script not found (moved source tree?)",
           script);
  const std::string out_dir =
      a.out_dir.empty() ? (fs::path(a.run_dir) / "plots").string() : a.out_dir;
  make_dirs(out_dir);
  const std::string python = find_python(a.python);
  spdlog::debug("plot: {} {} {} {}", python, script, a.run_dir, out_dir);
  const int rc = run_process({python, script, a.run_dir, out_dir}, /*quiet=*/false);
  FM_CHECK(rc != kScriptNoMatplotlib, "{} cannot import matplotlib; install the Debian package {}",
           python, kMatplotlibPackage);
  FM_CHECK(rc == 0, "{} {} failed (exit status {}); its message is above", python, script, rc);
  return 0;
}

}  // namespace

Runner add_plot(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "plot", "PNG plots of a run's metrics.jsonl (reward, KL/entropy, timing, expert load, loss)");
  auto a = std::make_shared<PlotArgs>();
  cmd->add_option("run_dir", a->run_dir, "run directory holding metrics.jsonl")->required();
  cmd->add_option("-o,--out", a->out_dir, "output directory (default: <run dir>/plots)");
  cmd->add_option("--python", a->python,
                  "Python 3 with matplotlib (default: $FOREMOE_PYTHON, else python3, else "
                  "/usr/bin/python3)");
  return [a] { return run_plot(*a); };
}

}  // namespace fm::cli
