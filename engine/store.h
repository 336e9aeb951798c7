// The rendezvous store: a TCP key-value store (Boost.Asio) that rank 0 serves and every rank
// reaches through StoreClient, as torch's TCPStore. Values are byte strings.
//
// Wire format (every integer little-endian):
//   frame    = magic:u32 (0x31534D46, the bytes "FMS1") | length:u32 | body (length bytes)
//   string   = n:u32 | n bytes            list = count:u32 | string * count
//   request  = op:u8 | fields, exactly filling the body:
//     1 set          key, value
//     2 get          key, timeout_ms:i64        (waits until the key exists)
//     3 wait         list keys, timeout_ms:i64  (waits until all exist)
//     4 add          key, delta:i64             (the value is a decimal integer; missing = 0)
//     5 compare_set  key, expected, desired
//     6 erase        key
//     7 check        list keys
//   reply    = status:u8 | payload
//     0 ok       set, wait: empty; get, compare_set: string; add: i64; erase, check: u8 (0/1)
//     1 timeout  list of the keys still missing when timeout_ms ran out
//     2 error    string (e.g. add on a value that is not an integer)
// A connection carries one request at a time: the client sends the next request only after
// the reply. A frame whose length passes the server's limit, a bad magic, an unknown op, a
// truncated or over-long body, or a second request before the reply closes that connection
// only; the server keeps serving the others. Waiting requests are parked in per-key waiter
// lists on the server's single I/O thread, so they never block other clients.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fm {

inline constexpr size_t kStoreMaxFrameBytes = size_t{64} << 20;

// Serves the store on its own I/O thread from construction until destruction (the destructor
// closes every connection and joins the thread). Binds exactly `host` (an IP address such as
// "127.0.0.1"; "0.0.0.0" listens on every interface) and `port` (0 picks a free port). The
// address is bound with SO_REUSEADDR so that a restarted server gets the same port back.
class StoreServer {
 public:
  StoreServer(const std::string& host, int port, size_t max_frame_bytes = kStoreMaxFrameBytes);
  ~StoreServer();
  StoreServer(const StoreServer&) = delete;
  StoreServer& operator=(const StoreServer&) = delete;

  int port() const;             // the bound port (the chosen one when constructed with 0)
  std::string address() const;  // the bound address, e.g. "127.0.0.1"

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

struct StoreOptions {
  // How long the constructor (and a reconnect) keeps retrying, with exponential back-off.
  std::chrono::milliseconds connect_timeout{30'000};
  // Bound on a request that does not wait for keys, and the extra time a waiting request
  // gets for its reply after its own timeout (the server ends the wait; this only catches a
  // server that stopped answering).
  std::chrono::milliseconds request_timeout{30'000};
  size_t max_frame_bytes = kStoreMaxFrameBytes;  // largest frame sent or accepted
};

// One connection to a StoreServer. Calls are serialized by a mutex, so threads may share a
// client, but a waiting call holds the connection: give each thread its own client when
// several wait at once. Every error is an fm::Error naming the store's host:port.
//
// Reconnection: before each request the client checks whether the server closed the
// connection (e.g. it restarted) and reconnects if so. A request that fails in flight
// (connection lost, no reply) throws, since re-sending an add or compare_set could apply it
// twice; the next request reconnects. A restarted server starts empty.
class StoreClient {
 public:
  using Ms = std::chrono::milliseconds;

  StoreClient(const std::string& host, int port, StoreOptions options = {});
  ~StoreClient();
  StoreClient(const StoreClient&) = delete;
  StoreClient& operator=(const StoreClient&) = delete;

  void set(const std::string& key, const std::string& value);
  // Waits until `key` exists and returns its value; throws after `timeout`, naming the key.
  std::string get(const std::string& key, Ms timeout);
  // Waits until every key exists; throws after `timeout`, naming the keys still missing.
  void wait(const std::vector<std::string>& keys, Ms timeout);
  // Atomically adds `delta` to the integer at `key` (created at 0) and returns the new value.
  int64_t add(const std::string& key, int64_t delta);
  // As torch's TCPStore compareSet: a missing key with `expected` empty is set to `desired`;
  // a present key whose value equals `expected` is set to `desired`. Returns the value stored
  // afterwards ("" when the key is still missing; torch returns `expected` there instead).
  std::string compare_set(const std::string& key, const std::string& expected,
                          const std::string& desired);
  bool erase(const std::string& key);                // true when the key existed
  bool check(const std::vector<std::string>& keys);  // all exist now; never waits

  const std::string& host() const;
  int port() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

// Blocks until `world_size` ranks have called it with the same `name`, or throws after
// `timeout` with how many had arrived. Each name serves one barrier: callers that barrier
// repeatedly add a generation (e.g. "step/17"). Uses the keys "barrier/<name>/arrived" and
// "barrier/<name>/done".
void store_barrier(StoreClient& store, const std::string& name, int world_size, int rank,
                   std::chrono::milliseconds timeout);

}  // namespace fm
