#include "engine/src/store_wire.h"
#include "engine/store.h"

namespace fm {

using namespace store_wire;

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

}  // namespace fm
