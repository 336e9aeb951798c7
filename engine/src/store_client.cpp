#include "engine/src/store_wire.h"
#include "engine/store.h"

namespace fm {

using namespace store_wire;

// ---------------------------------------------------------------------------------------------
// Client: blocking calls, each an asynchronous operation run on the client's own io_context
// up to a deadline (the standard Asio pattern for timeouts on blocking I/O).

class StoreClient::Impl {
 public:
  Impl(const std::string& host, int port, StoreOptions options)
      : host_(host), port_(port), options_(options) {
    FM_CHECK(port >= 1 && port <= 65535, "store client: port {} of host '{}' is out of range", port,
             host);
    FM_CHECK(options_.connect_timeout.count() > 0 && options_.request_timeout.count() > 0,
             "store client {}: connect_timeout and request_timeout must be positive", where());
    connect();
  }
  ~Impl() {
    error_code ignored;
    socket_.close(ignored);
  }

  std::string where() const { return fmt::format("{}:{}", host_, port_); }

  // Sends one request and returns the reply's status and payload.
  std::pair<Status, std::string> call(const std::string& what, FrameWriter& request,
                                      Clock::time_point deadline);

  std::string host_;
  int port_;
  StoreOptions options_;
  std::mutex mu_;

 private:
  bool run_until(Clock::time_point deadline);
  error_code connect_once(Clock::time_point deadline);
  void connect();
  bool peer_closed();
  [[noreturn]] void fail(const std::string& what, const std::string& problem);
  template <class Start>
  void step(const std::string& what, const char* doing, Clock::time_point deadline, Start start);

  asio::io_context io_;  // first member: destroyed last
  tcp::resolver resolver_{io_};
  tcp::socket socket_{io_};
};

// Runs the pending operation until it completes (true) or the deadline passes (false; the
// operation is then aborted and the socket closed).
bool StoreClient::Impl::run_until(Clock::time_point deadline) {
  io_.restart();
  io_.run_until(deadline);
  if (io_.stopped()) return true;  // ran out of work: the operation completed
  resolver_.cancel();
  error_code ignored;
  socket_.close(ignored);
  io_.restart();
  io_.run();  // delivers the aborted completion
  return false;
}

error_code StoreClient::Impl::connect_once(Clock::time_point deadline) {
  error_code result = asio::error::would_block;
  resolver_.async_resolve(host_, std::to_string(port_),
                          [&](error_code ec, const tcp::resolver::results_type& endpoints) {
                            if (ec) {
                              result = ec;
                              return;
                            }
                            asio::async_connect(socket_, endpoints,
                                                [&](error_code connect_ec, const tcp::endpoint&) {
                                                  result = connect_ec;
                                                });
                          });
  if (!run_until(deadline)) return asio::error::timed_out;
  return result;
}

void StoreClient::Impl::connect() {
  const auto deadline = Clock::now() + options_.connect_timeout;
  Ms backoff(10);
  int attempts = 0;
  std::string last_error;
  error_code ignored;
  for (;;) {
    socket_.close(ignored);
    ++attempts;
    const error_code ec = connect_once(deadline);
    if (!ec) {
      socket_.set_option(tcp::no_delay(true), ignored);
      return;
    }
    // An attempt cut short by the deadline says less than the refusal before it.
    if (ec != asio::error::timed_out || last_error.empty()) last_error = ec.message();
    const auto now = Clock::now();
    if (now >= deadline) break;
    std::this_thread::sleep_for(std::min<Clock::duration>(backoff, deadline - now));
    backoff = std::min(backoff * 2, Ms(1000));
    if (Clock::now() >= deadline) break;
  }
  socket_.close(ignored);
  throw Error(fmt::format("store {}: cannot connect, tried for {} ({} attempts; last error: {})",
                          where(), seconds_text(options_.connect_timeout), attempts, last_error));
}

// True when the server has closed the connection (or sent bytes nobody asked for).
bool StoreClient::Impl::peer_closed() {
  if (!socket_.is_open()) return true;
  char byte = 0;
  const ssize_t n = ::recv(socket_.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n >= 0) return true;  // 0: orderly close; > 0: stray bytes, start afresh
  return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

void StoreClient::Impl::fail(const std::string& what, const std::string& problem) {
  error_code ignored;
  socket_.close(ignored);
  throw Error(
      fmt::format("store {}: {}: {} (the next request reconnects)", where(), what, problem));
}

template <class Start>
void StoreClient::Impl::step(const std::string& what, const char* doing, Clock::time_point deadline,
                             Start start) {
  error_code result = asio::error::would_block;
  start([&](error_code ec, size_t) { result = ec; });
  if (!run_until(deadline)) fail(what, fmt::format("no progress {} before the deadline", doing));
  if (result == asio::error::eof)
    fail(what, fmt::format("connection closed by the store while {}", doing));
  if (result) fail(what, fmt::format("{} failed ({})", doing, result.message()));
}

std::pair<Status, std::string> StoreClient::Impl::call(const std::string& what,
                                                       FrameWriter& request,
                                                       Clock::time_point deadline) {
  if (request.body_bytes() > options_.max_frame_bytes)
    throw Error(fmt::format("store {}: {}: request of {} bytes exceeds the frame limit of {}",
                            where(), what, request.body_bytes(), options_.max_frame_bytes));
  const std::string frame = request.finish();
  if (peer_closed()) connect();
  step(what, "sending the request", deadline,
       [&](auto done) { asio::async_write(socket_, asio::buffer(frame), done); });
  char header[kHeaderBytes];
  step(what, "reading the reply", deadline,
       [&](auto done) { asio::async_read(socket_, asio::buffer(header), done); });
  const uint32_t length = load_u32(header + 4);
  if (load_u32(header) != kMagic) fail(what, "reply has a bad frame magic");
  if (length == 0 || length > options_.max_frame_bytes + 16)
    fail(what, fmt::format("reply length {} is out of range", length));
  std::string body(length, '\0');
  step(what, "reading the reply", deadline,
       [&](auto done) { asio::async_read(socket_, asio::buffer(body), done); });
  const auto status = static_cast<Status>(static_cast<uint8_t>(body[0]));
  body.erase(0, 1);
  if (status == Status::error)
    throw Error(fmt::format("store {}: {}: {}", where(), what, BodyReader(body).str()));
  if (status != Status::ok && status != Status::timeout)
    fail(what, fmt::format("reply has unknown status {}", static_cast<int>(status)));
  return {status, std::move(body)};
}

namespace {

// Parses a reply payload, turning a malformed one into an fm::Error.
template <class Fn>
auto parse_reply(const std::string& where, const std::string& what, const std::string& body,
                 Fn fn) {
  try {
    BodyReader in(body);
    auto value = fn(in);
    in.end();
    return value;
  } catch (const Malformed& e) {
    throw Error(fmt::format("store {}: {}: malformed reply ({})", where, what, e.what()));
  }
}

}  // namespace

StoreClient::StoreClient(const std::string& host, int port, StoreOptions options)
    : impl_(std::make_unique<Impl>(host, port, options)) {}
StoreClient::~StoreClient() = default;
const std::string& StoreClient::host() const {
  return impl_->host_;
}
int StoreClient::port() const {
  return impl_->port_;
}

void StoreClient::set(const std::string& key, const std::string& value) {
  std::lock_guard lock(impl_->mu_);
  const std::string what = fmt::format("set(\"{}\")", key);
  FrameWriter request;
  request.u8(uint8_t(Op::set)).str(key).str(value);
  impl_->call(what, request, deadline_after(impl_->options_.request_timeout));
}

std::string StoreClient::get(const std::string& key, Ms timeout) {
  std::lock_guard lock(impl_->mu_);
  const std::string what = fmt::format("get(\"{}\")", key);
  FM_CHECK(timeout.count() >= 0, "store {}: {}: negative timeout", impl_->where(), what);
  FrameWriter request;
  request.u8(uint8_t(Op::get)).str(key).i64(timeout.count());
  auto [status, body] =
      impl_->call(what, request, deadline_after(timeout, impl_->options_.request_timeout));
  if (status == Status::timeout)
    throw Error(fmt::format("store {}: {} timed out after {}: key \"{}\" still missing",
                            impl_->where(), what, seconds_text(timeout), key));
  return parse_reply(impl_->where(), what, body, [](BodyReader& in) { return in.str(); });
}

void StoreClient::wait(const std::vector<std::string>& keys, Ms timeout) {
  std::lock_guard lock(impl_->mu_);
  const std::string what = fmt::format("wait({})", quoted_keys(keys));
  FM_CHECK(timeout.count() >= 0, "store {}: {}: negative timeout", impl_->where(), what);
  FrameWriter request;
  request.u8(uint8_t(Op::wait)).list(keys).i64(timeout.count());
  auto [status, body] =
      impl_->call(what, request, deadline_after(timeout, impl_->options_.request_timeout));
  if (status == Status::timeout) {
    const auto absent =
        parse_reply(impl_->where(), what, body, [](BodyReader& in) { return in.list(); });
    throw Error(fmt::format("store {}: {} timed out after {}: still missing {} of {} keys: {}",
                            impl_->where(), what, seconds_text(timeout), absent.size(), keys.size(),
                            quoted_keys(absent)));
  }
  parse_reply(impl_->where(), what, body, [](BodyReader&) { return 0; });
}

int64_t StoreClient::add(const std::string& key, int64_t delta) {
  std::lock_guard lock(impl_->mu_);
  const std::string what = fmt::format("add(\"{}\", {})", key, delta);
  FrameWriter request;
  request.u8(uint8_t(Op::add)).str(key).i64(delta);
  const auto [status, body] =
      impl_->call(what, request, deadline_after(impl_->options_.request_timeout));
  return parse_reply(impl_->where(), what, body, [](BodyReader& in) { return in.i64(); });
}

std::string StoreClient::compare_set(const std::string& key, const std::string& expected,
                                     const std::string& desired) {
  std::lock_guard lock(impl_->mu_);
  const std::string what = fmt::format("compare_set(\"{}\")", key);
  FrameWriter request;
  request.u8(uint8_t(Op::compare_set)).str(key).str(expected).str(desired);
  const auto [status, body] =
      impl_->call(what, request, deadline_after(impl_->options_.request_timeout));
  return parse_reply(impl_->where(), what, body, [](BodyReader& in) { return in.str(); });
}

bool StoreClient::erase(const std::string& key) {
  std::lock_guard lock(impl_->mu_);
  const std::string what = fmt::format("erase(\"{}\")", key);
  FrameWriter request;
  request.u8(uint8_t(Op::erase)).str(key);
  const auto [status, body] =
      impl_->call(what, request, deadline_after(impl_->options_.request_timeout));
  return parse_reply(impl_->where(), what, body, [](BodyReader& in) { return in.u8() != 0; });
}

bool StoreClient::check(const std::vector<std::string>& keys) {
  std::lock_guard lock(impl_->mu_);
  const std::string what = fmt::format("check({})", quoted_keys(keys));
  FrameWriter request;
  request.u8(uint8_t(Op::check)).list(keys);
  const auto [status, body] =
      impl_->call(what, request, deadline_after(impl_->options_.request_timeout));
  return parse_reply(impl_->where(), what, body, [](BodyReader& in) { return in.u8() != 0; });
}

void store_barrier(StoreClient& store, const std::string& name, int world_size, int rank,
                   std::chrono::milliseconds timeout) {
  FM_CHECK(world_size >= 1 && rank >= 0 && rank < world_size,
           "barrier \"{}\": rank {} is out of range for world size {}", name, rank, world_size);
  const std::string arrived = "barrier/" + name + "/arrived";
  const std::string done = "barrier/" + name + "/done";
  const int64_t count = store.add(arrived, 1);
  FM_CHECK(count <= world_size,
           "barrier \"{}\": {} arrivals for a world of {} ranks (the name was used before, or "
           "the ranks disagree on the world size)",
           name, count, world_size);
  if (count == world_size) store.set(done, "1");
  try {
    store.wait({done}, timeout);
  } catch (const Error& e) {
    std::string seen = "an unknown number";
    try {
      seen = std::to_string(store.add(arrived, 0));
    } catch (const Error&) {
    }
    throw Error(fmt::format("barrier \"{}\" (rank {} of {}): {} of {} ranks arrived within {} ({})",
                            name, rank, world_size, seen, world_size, seconds_text(timeout),
                            e.what()));
  }
}

}  // namespace fm
