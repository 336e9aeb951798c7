// The store's wire format and shared helpers (engine/store.h documents the frames); private
// to engine/src/store_server.cpp and store_client.cpp.
#pragma once

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

namespace fm::store_wire {

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

inline std::string seconds_text(Ms ms) {
  return fmt::format("{:g} s", ms.count() / 1000.0);
}

inline std::string quoted_keys(const std::vector<std::string>& keys) {
  constexpr size_t kShown = 10;
  std::string out;
  for (size_t i = 0; i < keys.size() && i < kShown; ++i)
    out += fmt::format("{}\"{}\"", i ? ", " : "", keys[i]);
  if (keys.size() > kShown) out += fmt::format(" and {} more", keys.size() - kShown);
  return out;
}

inline Clock::time_point deadline_after(Ms wait, Ms extra = Ms(0)) {
  const int64_t total = std::min(wait.count(), kMaxWaitMs) + std::min(extra.count(), kMaxWaitMs);
  return Clock::now() + Ms(total);
}

inline uint32_t load_u32(const char* p) {
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

inline bool parse_int64(const std::string& s, int64_t& out) {
  const char* end = s.data() + s.size();
  const auto r = std::from_chars(s.data(), end, out);
  return !s.empty() && r.ec == std::errc() && r.ptr == end;
}

// Why a connection ended, for the log: empty for a hang-up or our own shutdown.
inline std::string hang_up_reason(const error_code& ec) {
  if (ec == asio::error::eof || ec == asio::error::operation_aborted ||
      ec == asio::error::connection_reset)
    return "";
  return ec.message();
}

inline std::string reply_frame(Status status) {
  return FrameWriter().u8(uint8_t(status)).finish();
}

}  // namespace fm::store_wire
