#include "engine/store.h"

#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <algorithm>
#include <boost/asio/connect.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <charconv>
#include <deque>
#include <mutex>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "engine/error.h"

namespace fm {

namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using boost::system::error_code;
using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

constexpr uint32_t kMagic = 0x31534D46;  // "FMS1" in little-endian byte order
constexpr size_t kHeaderBytes = 8;
// Waits are capped at 30 days so that deadlines cannot overflow the clock.
constexpr int64_t kMaxWaitMs = int64_t{30} * 24 * 3600 * 1000;

enum class Op : uint8_t { set = 1, get, wait, add, compare_set, erase, check };
enum class Status : uint8_t { ok = 0, timeout = 1, error = 2 };

std::string seconds_text(Ms ms) {
  return fmt::format("{:g} s", ms.count() / 1000.0);
}

std::string quoted_keys(const std::vector<std::string>& keys) {
  constexpr size_t kShown = 10;
  std::string out;
  for (size_t i = 0; i < keys.size() && i < kShown; ++i)
    out += fmt::format("{}\"{}\"", i ? ", " : "", keys[i]);
  if (keys.size() > kShown) out += fmt::format(" and {} more", keys.size() - kShown);
  return out;
}

Clock::time_point deadline_after(Ms wait, Ms extra = Ms(0)) {
  const int64_t total = std::min(wait.count(), kMaxWaitMs) + std::min(extra.count(), kMaxWaitMs);
  return Clock::now() + Ms(total);
}

uint32_t load_u32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

// Builds one frame: the header is filled in by finish().
class FrameWriter {
 public:
  FrameWriter() : out_(kHeaderBytes, '\0') {}
  FrameWriter& u8(uint8_t v) {
    out_.push_back(static_cast<char>(v));
    return *this;
  }
  FrameWriter& u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
    return *this;
  }
  FrameWriter& i64(int64_t v) {
    const auto u = static_cast<uint64_t>(v);
    for (int i = 0; i < 8; ++i) out_.push_back(static_cast<char>((u >> (8 * i)) & 0xFF));
    return *this;
  }
  FrameWriter& str(std::string_view s) {
    u32(static_cast<uint32_t>(s.size()));
    out_.append(s);
    return *this;
  }
  FrameWriter& list(const std::vector<std::string>& items) {
    u32(static_cast<uint32_t>(items.size()));
    for (const auto& s : items) str(s);
    return *this;
  }
  size_t body_bytes() const { return out_.size() - kHeaderBytes; }
  std::string finish() {
    const auto n = static_cast<uint32_t>(body_bytes());
    for (int i = 0; i < 4; ++i) {
      out_[i] = static_cast<char>((kMagic >> (8 * i)) & 0xFF);
      out_[4 + i] = static_cast<char>((n >> (8 * i)) & 0xFF);
    }
    return std::move(out_);
  }

 private:
  std::string out_;
};

// A body that does not parse: the server closes the connection, the client drops it.
struct Malformed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Reads the fields of one frame body; anything short or left over is Malformed.
class BodyReader {
 public:
  explicit BodyReader(std::string_view body) : body_(body) {}
  uint8_t u8() { return static_cast<uint8_t>(take(1)[0]); }
  uint32_t u32() { return load_u32(take(4).data()); }
  int64_t i64() {
    const std::string_view b = take(8);
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(b[i]);
    return static_cast<int64_t>(v);
  }
  std::string str() { return std::string(take(u32())); }
  std::vector<std::string> list() {
    const uint32_t count = u32();
    // Each string needs at least its 4-byte length: bounds the reservation by the body.
    if (count > (body_.size() - pos_) / 4)
      throw Malformed(fmt::format("list of {} strings does not fit the frame", count));
    std::vector<std::string> items;
    items.reserve(count);
    for (uint32_t i = 0; i < count; ++i) items.push_back(str());
    return items;
  }
  void end() const {
    if (pos_ != body_.size())
      throw Malformed(fmt::format("{} bytes left over after the fields", body_.size() - pos_));
  }

 private:
  std::string_view take(size_t n) {
    if (n > body_.size() - pos_)
      throw Malformed(fmt::format("truncated field at offset {} (wanted {} bytes, {} left)", pos_,
                                  n, body_.size() - pos_));
    const std::string_view out = body_.substr(pos_, n);
    pos_ += n;
    return out;
  }

  std::string_view body_;
  size_t pos_ = 0;
};

bool parse_int64(const std::string& s, int64_t& out) {
  const char* end = s.data() + s.size();
  const auto r = std::from_chars(s.data(), end, out);
  return !s.empty() && r.ec == std::errc() && r.ptr == end;
}

// Why a connection ended, for the log: empty for a hang-up or our own shutdown.
std::string hang_up_reason(const error_code& ec) {
  if (ec == asio::error::eof || ec == asio::error::operation_aborted ||
      ec == asio::error::connection_reset)
    return "";
  return ec.message();
}

std::string reply_frame(Status status) {
  return FrameWriter().u8(uint8_t(status)).finish();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Server: one I/O thread owns all state (data, waiters, connections); no locks.

class StoreServer::Impl {
 public:
  Impl(const std::string& host, int port, size_t max_frame_bytes);
  ~Impl();

  int port() const { return port_; }
  const std::string& address() const { return address_; }

 private:
  struct Waiter;
  struct Connection {
    explicit Connection(tcp::socket s) : socket(std::move(s)) {}
    tcp::socket socket;
    std::string peer;
    char header[kHeaderBytes] = {};
    std::string body;
    std::deque<std::string> out;     // reply frames being written, front first
    std::shared_ptr<Waiter> waiter;  // the parked get/wait, if any
    bool closed = false;
  };
  using ConnPtr = std::shared_ptr<Connection>;
  // A get or wait parked until its keys exist or its timer runs out.
  struct Waiter {
    explicit Waiter(asio::io_context& io) : timer(io) {}
    std::weak_ptr<Connection> conn;
    std::vector<std::string> keys;
    bool want_value = false;  // get: reply with the value of keys[0]
    bool done = false;
    asio::steady_timer timer;
  };
  using WaiterPtr = std::shared_ptr<Waiter>;

  void accept_next();
  void read_header(const ConnPtr& c);
  void read_body(const ConnPtr& c);
  void handle(const ConnPtr& c);
  void park(const ConnPtr& c, std::vector<std::string> keys, bool want_value, int64_t timeout_ms);
  void register_missing(const WaiterPtr& w);
  void unregister(const WaiterPtr& w);
  void notify(const std::string& key);
  void finish(const WaiterPtr& w);
  std::vector<std::string> missing(const std::vector<std::string>& keys) const;
  void reply(const ConnPtr& c, std::string frame);
  void write_next(const ConnPtr& c);
  void close(const ConnPtr& c, const std::string& reason);
  void shutdown_all();

  asio::io_context io_;  // first member: destroyed last
  asio::executor_work_guard<asio::io_context::executor_type> work_{io_.get_executor()};
  tcp::acceptor acceptor_{io_};
  asio::steady_timer accept_retry_{io_};
  size_t max_frame_bytes_;
  std::string address_;
  int port_ = 0;
  std::unordered_map<std::string, std::string> data_;
  std::unordered_map<std::string, std::vector<WaiterPtr>> waiters_;  // by missing key
  std::unordered_set<ConnPtr> connections_;
  std::thread thread_;
};

StoreServer::Impl::Impl(const std::string& host, int port, size_t max_frame_bytes)
    : max_frame_bytes_(max_frame_bytes) {
  FM_CHECK(port >= 0 && port <= 65535, "store server: port {} is out of range (0..65535)", port);
  FM_CHECK(max_frame_bytes_ >= 64 && max_frame_bytes_ <= UINT32_MAX,
           "store server: max_frame_bytes {} is out of range (64..{})", max_frame_bytes_,
           UINT32_MAX);
  error_code ec;
  const auto addr = asio::ip::make_address(host, ec);
  FM_CHECK(!ec, "store server: '{}' is not an IP address to bind ({})", host, ec.message());
  const tcp::endpoint endpoint(addr, static_cast<uint16_t>(port));
  const auto fail = [&](const char* step) {
    throw Error(fmt::format("store server: cannot {} {}:{} ({})", step, host, port, ec.message()));
  };
  if (acceptor_.open(endpoint.protocol(), ec)) fail("open a socket for");
  if (acceptor_.set_option(tcp::acceptor::reuse_address(true), ec)) fail("set SO_REUSEADDR on");
  if (acceptor_.bind(endpoint, ec)) fail("bind");
  if (acceptor_.listen(asio::socket_base::max_listen_connections, ec)) fail("listen on");
  const tcp::endpoint bound = acceptor_.local_endpoint();
  address_ = bound.address().to_string();
  port_ = bound.port();
  accept_next();
  thread_ = std::thread([this] {
    for (;;) {
      try {
        io_.run();
        return;
      } catch (const std::exception& e) {
        spdlog::error("store server {}:{}: {}", address_, port_, e.what());
      }
    }
  });
  spdlog::debug("store server listening on {}:{}", address_, port_);
}

StoreServer::Impl::~Impl() {
  asio::post(io_, [this] {
    shutdown_all();
    io_.stop();
  });
  thread_.join();
  // Handlers that never ran are destroyed with io_; drop the state that refers to them first.
  waiters_.clear();
  connections_.clear();
}

void StoreServer::Impl::shutdown_all() {
  error_code ignored;
  acceptor_.close(ignored);
  accept_retry_.cancel();
  const std::vector<ConnPtr> open(connections_.begin(), connections_.end());
  for (const auto& c : open) close(c, "");
}

void StoreServer::Impl::accept_next() {
  acceptor_.async_accept([this](error_code ec, tcp::socket socket) {
    if (!acceptor_.is_open()) return;
    if (ec) {
      // E.g. out of file descriptors: retry shortly instead of spinning.
      spdlog::warn("store server {}:{}: accept failed ({})", address_, port_, ec.message());
      accept_retry_.expires_after(Ms(50));
      accept_retry_.async_wait([this](error_code wait_ec) {
        if (!wait_ec) accept_next();
      });
      return;
    }
    auto c = std::make_shared<Connection>(std::move(socket));
    error_code ignored;
    c->socket.set_option(tcp::no_delay(true), ignored);
    const auto remote = c->socket.remote_endpoint(ignored);
    c->peer = fmt::format("{}:{}", remote.address().to_string(), remote.port());
    connections_.insert(c);
    read_header(c);
    accept_next();
  });
}

// The connection always has a read pending, so that a client hanging up during a parked
// wait is noticed at once.
void StoreServer::Impl::read_header(const ConnPtr& c) {
  asio::async_read(c->socket, asio::buffer(c->header), [this, c](error_code ec, size_t) {
    if (ec) {
      close(c, hang_up_reason(ec));
      return;
    }
    if (load_u32(c->header) != kMagic) {
      close(c, fmt::format("bad frame magic 0x{:08x}", load_u32(c->header)));
      return;
    }
    const uint32_t length = load_u32(c->header + 4);
    if (length > max_frame_bytes_) {
      close(c, fmt::format("frame of {} bytes exceeds the limit of {}", length, max_frame_bytes_));
      return;
    }
    if (c->waiter) {
      close(c, "a new request arrived before the reply to the previous one");
      return;
    }
    c->body.resize(length);
    read_body(c);
  });
}

void StoreServer::Impl::read_body(const ConnPtr& c) {
  asio::async_read(c->socket, asio::buffer(c->body), [this, c](error_code ec, size_t) {
    if (ec) {
      close(c, hang_up_reason(ec));
      return;
    }
    try {
      handle(c);
    } catch (const std::exception& e) {  // Malformed, or e.g. bad_alloc
      close(c, e.what());
      return;
    }
    read_header(c);
  });
}

void StoreServer::Impl::handle(const ConnPtr& c) {
  BodyReader in(c->body);
  const uint8_t op = in.u8();
  const auto timeout_ms = [&] {
    const int64_t t = in.i64();
    if (t < 0) throw Malformed(fmt::format("negative timeout {} ms", t));
    return std::min(t, kMaxWaitMs);
  };
  switch (static_cast<Op>(op)) {
    case Op::set: {
      std::string key = in.str();
      std::string value = in.str();
      in.end();
      data_[key] = std::move(value);
      reply(c, reply_frame(Status::ok));
      notify(key);
      return;
    }
    case Op::get: {
      std::string key = in.str();
      const int64_t t = timeout_ms();
      in.end();
      const auto it = data_.find(key);
      if (it != data_.end())
        reply(c, FrameWriter().u8(uint8_t(Status::ok)).str(it->second).finish());
      else
        park(c, {std::move(key)}, true, t);
      return;
    }
    case Op::wait: {
      std::vector<std::string> keys = in.list();
      const int64_t t = timeout_ms();
      in.end();
      if (missing(keys).empty())
        reply(c, reply_frame(Status::ok));
      else
        park(c, std::move(keys), false, t);
      return;
    }
    case Op::add: {
      std::string key = in.str();
      const int64_t delta = in.i64();
      in.end();
      int64_t value = 0;
      const auto it = data_.find(key);
      if (it != data_.end() && !parse_int64(it->second, value)) {
        reply(c, FrameWriter()
                     .u8(uint8_t(Status::error))
                     .str(fmt::format("add: key \"{}\" holds a value that is not a decimal integer",
                                      key))
                     .finish());
        return;
      }
      if (__builtin_add_overflow(value, delta, &value)) {
        reply(c, FrameWriter()
                     .u8(uint8_t(Status::error))
                     .str(fmt::format("add: key \"{}\" would overflow int64 ({} + {})", key,
                                      it->second, delta))
                     .finish());
        return;
      }
      data_[key] = std::to_string(value);
      reply(c, FrameWriter().u8(uint8_t(Status::ok)).i64(value).finish());
      notify(key);
      return;
    }
    case Op::compare_set: {
      std::string key = in.str();
      std::string expected = in.str();
      std::string desired = in.str();
      in.end();
      const auto it = data_.find(key);
      std::string now;
      bool changed = false;
      if (it == data_.end()) {
        if (expected.empty()) {
          data_[key] = desired;
          now = std::move(desired);
          changed = true;
        }
      } else {
        if (it->second == expected) {
          it->second = std::move(desired);
          changed = true;
        }
        now = it->second;
      }
      reply(c, FrameWriter().u8(uint8_t(Status::ok)).str(now).finish());
      if (changed) notify(key);
      return;
    }
    case Op::erase: {
      const std::string key = in.str();
      in.end();
      const bool existed = data_.erase(key) > 0;
      reply(c, FrameWriter().u8(uint8_t(Status::ok)).u8(existed ? 1 : 0).finish());
      return;
    }
    case Op::check: {
      const std::vector<std::string> keys = in.list();
      in.end();
      const bool all = missing(keys).empty();
      reply(c, FrameWriter().u8(uint8_t(Status::ok)).u8(all ? 1 : 0).finish());
      return;
    }
  }
  throw Malformed(fmt::format("unknown op {}", op));
}

std::vector<std::string> StoreServer::Impl::missing(const std::vector<std::string>& keys) const {
  std::vector<std::string> out;
  for (const auto& k : keys)
    if (!data_.contains(k)) out.push_back(k);
  return out;
}

void StoreServer::Impl::park(const ConnPtr& c, std::vector<std::string> keys, bool want_value,
                             int64_t timeout_ms) {
  auto w = std::make_shared<Waiter>(io_);
  w->conn = c;
  w->keys = std::move(keys);
  w->want_value = want_value;
  c->waiter = w;
  register_missing(w);
  w->timer.expires_after(Ms(timeout_ms));
  w->timer.async_wait([this, w](error_code ec) {
    if (!ec && !w->done) finish(w);
  });
}

void StoreServer::Impl::register_missing(const WaiterPtr& w) {
  for (const auto& k : w->keys) {
    if (data_.contains(k)) continue;
    auto& list = waiters_[k];
    if (std::find(list.begin(), list.end(), w) == list.end()) list.push_back(w);
  }
}

void StoreServer::Impl::unregister(const WaiterPtr& w) {
  for (const auto& k : w->keys) {
    const auto it = waiters_.find(k);
    if (it == waiters_.end()) continue;
    std::erase(it->second, w);
    if (it->second.empty()) waiters_.erase(it);
  }
}

// `key` was created or changed: release the waiters whose keys now all exist.
void StoreServer::Impl::notify(const std::string& key) {
  const auto it = waiters_.find(key);
  if (it == waiters_.end()) return;
  const std::vector<WaiterPtr> list = std::move(it->second);
  waiters_.erase(it);
  for (const auto& w : list) {
    if (w->done) continue;
    if (missing(w->keys).empty())
      finish(w);
    else
      register_missing(w);  // a key present at park time may have been erased since
  }
}

// Replies to a parked request: ok when its keys exist, timeout (naming the missing) otherwise.
void StoreServer::Impl::finish(const WaiterPtr& w) {
  w->done = true;
  w->timer.cancel();
  unregister(w);
  const ConnPtr c = w->conn.lock();
  if (!c || c->closed) return;
  c->waiter.reset();
  const std::vector<std::string> absent = missing(w->keys);
  if (!absent.empty())
    reply(c, FrameWriter().u8(uint8_t(Status::timeout)).list(absent).finish());
  else if (w->want_value)
    reply(c, FrameWriter().u8(uint8_t(Status::ok)).str(data_.at(w->keys[0])).finish());
  else
    reply(c, reply_frame(Status::ok));
}

void StoreServer::Impl::reply(const ConnPtr& c, std::string frame) {
  if (c->closed) return;
  c->out.push_back(std::move(frame));
  if (c->out.size() == 1) write_next(c);
}

void StoreServer::Impl::write_next(const ConnPtr& c) {
  asio::async_write(c->socket, asio::buffer(c->out.front()), [this, c](error_code ec, size_t) {
    if (ec) {
      close(c, hang_up_reason(ec));
      return;
    }
    c->out.pop_front();
    if (!c->out.empty()) write_next(c);
  });
}

// reason: empty for an ordinary hang-up, else why the connection is dropped (logged).
void StoreServer::Impl::close(const ConnPtr& c, const std::string& reason) {
  if (c->closed) return;
  c->closed = true;
  if (!reason.empty())
    spdlog::warn("store server {}:{}: closing the connection from {}: {}", address_, port_, c->peer,
                 reason);
  error_code ignored;
  c->socket.shutdown(tcp::socket::shutdown_both, ignored);
  c->socket.close(ignored);
  if (c->waiter) {
    c->waiter->done = true;
    c->waiter->timer.cancel();
    unregister(c->waiter);
    c->waiter.reset();
  }
  connections_.erase(c);
}

StoreServer::StoreServer(const std::string& host, int port, size_t max_frame_bytes)
    : impl_(std::make_unique<Impl>(host, port, max_frame_bytes)) {}
StoreServer::~StoreServer() = default;
int StoreServer::port() const {
  return impl_->port();
}
std::string StoreServer::address() const {
  return impl_->address();
}

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
