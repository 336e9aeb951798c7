#include "engine/dist_env.h"

#include <fmt/format.h>

#include <charconv>
#include <cstdlib>
#include <limits>

#include "engine/error.h"

namespace fm {

namespace {

// The variables of one launcher, read through the injected getenv; every error names the
// variable and the launcher it was read for.
class EnvReader {
 public:
  EnvReader(const std::function<const char*(const char*)>& getenv, std::string source)
      : getenv_(getenv), source_(std::move(source)) {}

  const char* raw(const char* name) const { return getenv_(name); }
  bool has(const char* name) const { return raw(name) != nullptr; }

  [[noreturn]] void fail(const std::string& problem) const {
    throw Error(fmt::format("rank discovery ({} environment): {}", source_, problem));
  }

  std::string text(const char* name) const {
    const char* v = raw(name);
    if (v == nullptr) fail(fmt::format("{} is not set", name));
    if (*v == '\0') fail(fmt::format("{} is set but empty", name));
    return v;
  }

  // A decimal integer in [lo, hi]; `range` says where the bounds come from.
  int integer(const char* name, int64_t lo, int64_t hi, const std::string& range) const {
    const std::string v = text(name);
    int64_t parsed = 0;
    const auto r = std::from_chars(v.data(), v.data() + v.size(), parsed);
    if (r.ec != std::errc() || r.ptr != v.data() + v.size())
      fail(fmt::format("{}='{}' is not a decimal integer", name, v));
    if (parsed < 0 && lo >= 0) fail(fmt::format("{}={} is negative", name, parsed));
    if (parsed < lo || parsed > hi)
      fail(fmt::format("{}={} is out of range ({})", name, parsed, range));
    return static_cast<int>(parsed);
  }

  int port(const char* name) const { return integer(name, 1, 65535, "a TCP port is 1..65535"); }

 private:
  const std::function<const char*(const char*)>& getenv_;
  std::string source_;
};

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

// The rank fields common to every launcher, validated against each other.
void read_ranks(const EnvReader& env, DistEnv& out, const char* rank, const char* world,
                const char* local_rank) {
  out.world_size = env.integer(world, 1, kIntMax, "at least 1");
  out.rank = env.integer(rank, 0, out.world_size - 1,
                         fmt::format("must be below {}={}", world, out.world_size));
  out.local_rank = env.integer(local_rank, 0, out.world_size - 1,
                               fmt::format("must be below {}={}", world, out.world_size));
}

void check_local(const EnvReader& env, const DistEnv& out, const char* local_rank,
                 const char* local_world) {
  if (out.local_world_size > out.world_size)
    env.fail(fmt::format("{}={} exceeds the world size {}", local_world, out.local_world_size,
                         out.world_size));
  if (out.local_rank >= out.local_world_size)
    env.fail(fmt::format("{}={} is out of range (must be below {}={})", local_rank, out.local_rank,
                         local_world, out.local_world_size));
}

DistEnv from_torchrun(const EnvReader& env) {
  DistEnv out;
  out.source = "torchrun";
  read_ranks(env, out, "RANK", "WORLD_SIZE", "LOCAL_RANK");
  out.local_world_size = env.integer("LOCAL_WORLD_SIZE", 1, kIntMax, "at least 1");
  check_local(env, out, "LOCAL_RANK", "LOCAL_WORLD_SIZE");
  out.master_addr = env.text("MASTER_ADDR");
  out.master_port = env.port("MASTER_PORT");
  return out;
}

DistEnv from_openmpi(const EnvReader& env) {
  DistEnv out;
  out.source = "openmpi";
  read_ranks(env, out, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
             "OMPI_COMM_WORLD_LOCAL_RANK");
  out.local_world_size = env.integer("OMPI_COMM_WORLD_LOCAL_SIZE", 1, kIntMax, "at least 1");
  check_local(env, out, "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE");
  out.master_addr = env.text("MASTER_ADDR");
  out.master_port = env.port("MASTER_PORT");
  return out;
}

// This node's entry of SLURM_TASKS_PER_NODE, e.g. "4(x2),3" lists nodes 0 and 1 with 4 tasks
// and node 2 with 3.
int slurm_tasks_on_node(const EnvReader& env, int node_id) {
  const std::string spec = env.text("SLURM_TASKS_PER_NODE");
  const auto bad = [&] {
    env.fail(fmt::format("SLURM_TASKS_PER_NODE='{}' is not of the form '4(x2),3'", spec));
  };
  int64_t node = 0;
  size_t pos = 0;
  while (pos < spec.size()) {
    size_t end = spec.find(',', pos);
    if (end == std::string::npos) end = spec.size();
    const std::string entry = spec.substr(pos, end - pos);
    int64_t tasks = 0;
    int64_t repeat = 1;
    const char* p = entry.data();
    const char* last = entry.data() + entry.size();
    auto r = std::from_chars(p, last, tasks);
    if (r.ec != std::errc() || tasks < 1) bad();
    if (r.ptr != last) {
      if (last - r.ptr < 4 || r.ptr[0] != '(' || r.ptr[1] != 'x' || last[-1] != ')') bad();
      const auto rr = std::from_chars(r.ptr + 2, last - 1, repeat);
      if (rr.ec != std::errc() || rr.ptr != last - 1 || repeat < 1) bad();
    }
    if (node_id < node + repeat) return static_cast<int>(tasks);
    node += repeat;
    pos = end + 1;
  }
  env.fail(fmt::format("SLURM_NODEID={} has no entry in SLURM_TASKS_PER_NODE='{}'", node_id, spec));
}

// The first host of a Slurm node list: "a,b" -> "a"; "gpu[03-08,11],cpu1" -> "gpu03".
std::string slurm_first_host(const EnvReader& env, const char* name) {
  const std::string list = env.text(name);
  const auto unsupported = [&](const char* why) {
    env.fail(fmt::format("{}='{}' {}; set MASTER_ADDR to the store's host", name, list, why));
  };
  size_t end = list.size();
  int depth = 0;
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i] == '[') ++depth;
    if (list[i] == ']') --depth;
    if (list[i] == ',' && depth == 0) {
      end = i;
      break;
    }
  }
  const std::string first = list.substr(0, end);
  const size_t open = first.find('[');
  if (open == std::string::npos) {
    if (first.empty() || first.find(']') != std::string::npos) unsupported("is not a node list");
    return first;
  }
  const size_t close = first.find(']', open);
  if (close == std::string::npos) unsupported("has an unclosed '['");
  if (first.find('[', close) != std::string::npos)
    unsupported("has more than one bracket range in a host name (not supported)");
  const std::string inside = first.substr(open + 1, close - open - 1);
  const std::string number = inside.substr(0, inside.find_first_of(",-"));
  if (number.empty() || number.find_first_not_of("0123456789") != std::string::npos)
    unsupported("has a bracket range that does not start with a number");
  return first.substr(0, open) + number + first.substr(close + 1);
}

DistEnv from_slurm(const EnvReader& env) {
  DistEnv out;
  out.source = "slurm";
  read_ranks(env, out, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID");
  if (env.has("SLURM_NTASKS_PER_NODE")) {
    out.local_world_size = env.integer("SLURM_NTASKS_PER_NODE", 1, kIntMax, "at least 1");
  } else if (env.has("SLURM_TASKS_PER_NODE")) {
    const int node = env.integer("SLURM_NODEID", 0, kIntMax, "at least 0");
    out.local_world_size = slurm_tasks_on_node(env, node);
  } else if (env.has("SLURM_NNODES")) {
    const int nodes = env.integer("SLURM_NNODES", 1, kIntMax, "at least 1");
    if (out.world_size % nodes != 0)
      env.fail(
          fmt::format("SLURM_NTASKS={} is not a multiple of SLURM_NNODES={}; set "
                      "SLURM_NTASKS_PER_NODE",
                      out.world_size, nodes));
    out.local_world_size = out.world_size / nodes;
  } else {
    env.fail(
        "none of SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE and SLURM_NNODES is set (needed for "
        "the tasks per node)");
  }
  check_local(env, out, "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE (or its derivation)");
  if (env.has("MASTER_ADDR"))
    out.master_addr = env.text("MASTER_ADDR");
  else if (env.has("SLURM_JOB_NODELIST"))
    out.master_addr = slurm_first_host(env, "SLURM_JOB_NODELIST");
  else if (env.has("SLURM_NODELIST"))
    out.master_addr = slurm_first_host(env, "SLURM_NODELIST");
  else
    env.fail(
        "none of MASTER_ADDR, SLURM_JOB_NODELIST and SLURM_NODELIST is set (needed for the "
        "store's host)");
  if (env.has("MASTER_PORT")) {
    out.master_port = env.port("MASTER_PORT");
  } else {
    if (!env.has("SLURM_JOB_ID"))
      env.fail("neither MASTER_PORT nor SLURM_JOB_ID (to derive a port from) is set");
    out.master_port = 20000 + env.integer("SLURM_JOB_ID", 0, kIntMax, "at least 0") % 10000;
  }
  return out;
}

DistEnv single_process(const EnvReader& env) {
  DistEnv out;
  if (env.has("MASTER_ADDR")) out.master_addr = env.text("MASTER_ADDR");
  if (env.has("MASTER_PORT")) out.master_port = env.port("MASTER_PORT");
  return out;
}

bool any_set(const EnvReader& env, std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (env.has(n)) return true;
  return false;
}

}  // namespace

DistEnv dist_env_from(const std::function<const char*(const char*)>& getenv) {
  const EnvReader torchrun(getenv, "torchrun-style");
  if (any_set(torchrun, {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}))
    return from_torchrun(torchrun);
  const EnvReader openmpi(getenv, "Open MPI");
  if (any_set(openmpi, {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                        "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"}))
    return from_openmpi(openmpi);
  const EnvReader slurm(getenv, "Slurm");
  if (slurm.has("SLURM_PROCID")) return from_slurm(slurm);
  return single_process(EnvReader(getenv, "single-process"));
}

DistEnv dist_env_from_environment() {
  return dist_env_from([](const char* name) -> const char* { return std::getenv(name); });
}

}  // namespace fm
