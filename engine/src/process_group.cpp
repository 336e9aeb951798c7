// make_process_group(): the rendezvous every process-group backend shares (store server on
// rank 0, a client per rank, a store barrier), then the backend's own setup. Stand-ins for the
// backends this build lacks say which package or option is missing.
#include "engine/process_group.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netdb.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>

#include "engine/error.h"
#include "engine/src/process_group_backends.h"
#include "engine/store.h"

namespace fm {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

struct AddrInfo {
  addrinfo* list = nullptr;
  ~AddrInfo() {
    if (list) freeaddrinfo(list);
  }
};

std::string numeric_address(const sockaddr* addr) {
  char text[INET6_ADDRSTRLEN] = {};
  const void* bytes =
      addr->sa_family == AF_INET6
          ? static_cast<const void*>(&reinterpret_cast<const sockaddr_in6*>(addr)->sin6_addr)
          : static_cast<const void*>(&reinterpret_cast<const sockaddr_in*>(addr)->sin_addr);
  if (!inet_ntop(addr->sa_family, bytes, text, sizeof text))
    throw Error("process group: cannot format a socket address");
  return text;
}

// The first address of `host` (a name or an IP), and this host's address on the interface that
// routes there (a UDP socket "connected" to it: no packet is sent).
struct Route {
  std::string remote, local;
};
Route route_to(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  AddrInfo info;
  if (const int rc = getaddrinfo(host.c_str(), "1", &hints, &info.list); rc != 0 || !info.list)
    throw Error(fmt::format("process group: cannot resolve master address \"{}\": {}", host,
                            gai_strerror(rc)));
  const addrinfo* ai = info.list;
  Route route{numeric_address(ai->ai_addr), ""};
  const int fd = socket(ai->ai_family, SOCK_DGRAM, 0);
  if (fd < 0) throw Error(fmt::format("process group: socket() failed for \"{}\"", host));
  sockaddr_storage local{};
  socklen_t len = sizeof local;
  const bool ok = connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0;
  close(fd);
  if (!ok)
    throw Error(fmt::format("process group: no route from this host to master address \"{}\" ({})",
                            host, route.remote));
  route.local = numeric_address(reinterpret_cast<const sockaddr*>(&local));
  return route;
}

milliseconds left_until(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
  return std::max(left, milliseconds(1));
}

}  // namespace

bool process_group_backend_built(const std::string& backend) {
#ifdef FOREMOE_HAVE_GLOO
  if (backend == "gloo") return true;
#endif
#ifdef FOREMOE_HAVE_NCCL
  if (backend == "nccl") return true;
#endif
  return false;
}

// A peer that dies closes its sockets, and writing to such a socket raises SIGPIPE, whose
// default action kills the writer: the survivors would die with their peer instead of failing
// their call with an error (Gloo's TCP transport does not ask send() to spare the signal).
// Ignored here, as network servers do, unless the program installed a handler of its own.
static void ignore_sigpipe() {
  struct sigaction current {};
  if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL)
    signal(SIGPIPE, SIG_IGN);
}

std::unique_ptr<Communicator> make_process_group(const DistEnv& env, const std::string& backend,
                                                 milliseconds timeout) {
  ignore_sigpipe();
  const std::string where =
      fmt::format("make_process_group(\"{}\") on rank {} of {}", backend, env.rank, env.world_size);
  FM_CHECK(backend == "gloo" || backend == "nccl",
           "{}: unknown backend (expected \"gloo\" or \"nccl\")", where);
  FM_CHECK(env.world_size >= 1 && env.rank >= 0 && env.rank < env.world_size,
           "{}: rank {} is not a rank of a world of {}", where, env.rank, env.world_size);
  FM_CHECK(timeout.count() > 0, "{}: timeout {} ms is not positive", where, timeout.count());
  FM_CHECK(env.master_port > 0 || env.world_size == 1,
           "{}: master_port {} is not a port (set MASTER_PORT; only a group of one rank may leave "
           "it 0)",
           where, env.master_port);
  if (!process_group_backend_built(backend)) {
    if (backend == "gloo")
      throw Error(fmt::format(
          "{}: this foremoe build has no Gloo backend (install Debian's libgloo-dev, e.g. "
          "`make deps`, and reconfigure)",
          where));
    throw Error(fmt::format(
        "{}: this foremoe build has no NCCL backend (needs the CUDA toolkit with NCCL, nccl.h "
        "and libnccl, and FOREMOE_CUDA=AUTO or ON; e.g. Debian's libnccl-dev)",
        where));
  }

  const auto deadline = Clock::now() + timeout;
  ProcessGroupRendezvous rv;
  rv.env = env;
  rv.timeout = timeout;
  const Route route = route_to(env.master_addr);
  rv.local_address = route.local;
  const std::string store_at = fmt::format("{}:{}", env.master_addr, env.master_port);
  try {
    int port = env.master_port;
    if (env.rank == 0) {
      rv.server = std::make_unique<StoreServer>(route.remote, env.master_port);
      port = rv.server->port();
    }
    StoreOptions options;
    options.connect_timeout = left_until(deadline);
    options.request_timeout = timeout;
    rv.store = std::make_unique<StoreClient>(route.remote, port, options);
    store_barrier(*rv.store, "process_group/" + backend + "/rendezvous", env.world_size, env.rank,
                  left_until(deadline));
  } catch (const std::exception& e) {
    throw Error(fmt::format("{}: rendezvous at store {} failed within {} ms: {}", where, store_at,
                            timeout.count(), e.what()));
  }
  if (backend == "gloo") return make_gloo_communicator(std::move(rv));
  return make_nccl_communicator(std::move(rv));
}

#ifndef FOREMOE_HAVE_GLOO
std::unique_ptr<Communicator> make_gloo_communicator(ProcessGroupRendezvous) {
  throw Error("this foremoe build has no Gloo backend (install Debian's libgloo-dev)");
}
#endif
#ifndef FOREMOE_HAVE_NCCL
std::unique_ptr<Communicator> make_nccl_communicator(ProcessGroupRendezvous) {
  throw Error("this foremoe build has no NCCL backend (needs the CUDA toolkit with NCCL)");
}
#endif

}  // namespace fm
