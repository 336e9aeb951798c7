// The rendezvous store: each operation's semantics, waits and their timeouts, many clients at
// once, malformed frames, reconnects, binding, and the barrier built on it. Timeouts are short
// (0.2-0.4 s) so the file runs in a few seconds; timing bounds allow 1 s of slack for a loaded
// 2-core machine.
#include "engine/store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <random>
#include <thread>

#include "engine/error.h"

namespace fm {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr auto kSlack = 1000ms;  // scheduling slack on a shared 2-core machine

StoreOptions quick_options() {
  StoreOptions o;
  o.connect_timeout = 2s;
  o.request_timeout = 5s;
  return o;
}

std::string where(const StoreServer& server) {
  return fmt::format("127.0.0.1:{}", server.port());
}

// Hand-built frames (see the wire format in engine/store.h).
std::string le32(uint32_t v) {
  std::string s(4, '\0');
  for (int i = 0; i < 4; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xFF);
  return s;
}
std::string le64(int64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i)
    s[i] = static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xFF);
  return s;
}
std::string field(const std::string& s) {
  return le32(static_cast<uint32_t>(s.size())) + s;
}
std::string frame(const std::string& body) {
  return le32(0x31534D46) + le32(static_cast<uint32_t>(body.size())) + body;
}

// A raw connection to the store, for bytes no StoreClient would send.
class RawConnection {
 public:
  explicit RawConnection(int port) : socket_(io_) {
    socket_.connect(
        tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port)));
  }
  void send(const std::string& bytes) { asio::write(socket_, asio::buffer(bytes)); }
  // Reads whatever arrives within `limit`; true when the server then closed the connection.
  bool closed_by_server(std::chrono::milliseconds limit, std::string* received = nullptr) {
    const auto deadline = Clock::now() + limit;
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return false;
      pollfd p{socket_.native_handle(), POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
      char buf[256];
      const ssize_t n = ::recv(socket_.native_handle(), buf, sizeof buf, 0);
      if (n <= 0) return true;  // orderly close or reset
      if (received) received->append(buf, static_cast<size_t>(n));
    }
  }

 private:
  asio::io_context io_;
  tcp::socket socket_;
};

TEST(Store, SetGetRoundTripsBinaryValues) {
  StoreServer server("127.0.0.1", 0);
  StoreClient client("127.0.0.1", server.port(), quick_options());
  std::mt19937 rng(7);
  std::string big(1 << 20, '\0');
  for (auto& ch : big) ch = static_cast<char>(rng());
  const std::string with_nul("a\0b\0", 4);
  client.set("big", big);
  client.set(with_nul, with_nul);
  client.set("empty", "");
  EXPECT_EQ(client.get("big", 1s), big);
  EXPECT_EQ(client.get(with_nul, 1s), with_nul);
  EXPECT_EQ(client.get("empty", 1s), "");
  client.set("big", "replaced");
  EXPECT_EQ(client.get("big", 1s), "replaced");
}

TEST(Store, GetOnMissingKeyTimesOutNamingKeyStoreAndTimeout) {
  StoreServer server("127.0.0.1", 0);
  StoreClient client("127.0.0.1", server.port(), quick_options());
  const auto start = Clock::now();
  try {
    client.get("never/set", 300ms);
    FAIL() << "get on a missing key returned";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("\"never/set\""));
    EXPECT_THAT(e.what(), HasSubstr(where(server)));
    EXPECT_THAT(e.what(), HasSubstr("0.3 s"));
  }
  const auto elapsed = Clock::now() - start;
  EXPECT_GE(elapsed, 300ms);
  EXPECT_LT(elapsed, 300ms + kSlack);
  // The connection stays usable after a timed-out wait.
  client.set("k", "v");
  EXPECT_EQ(client.get("k", 1s), "v");
}

TEST(Store, GetWaitsForALaterSetWithoutBlockingOtherClients) {
  StoreServer server("127.0.0.1", 0);
  StoreClient waiter("127.0.0.1", server.port(), quick_options());
  StoreClient other("127.0.0.1", server.port(), quick_options());
  std::string got;
  std::thread t([&] { got = waiter.get("late", 5s); });
  std::this_thread::sleep_for(100ms);  // let the get park on the server
  // While the get is parked, another client is served at once.
  const auto start = Clock::now();
  for (int i = 0; i < 20; ++i) {
    other.set(fmt::format("k{}", i), "x");
    EXPECT_EQ(other.get(fmt::format("k{}", i), 1s), "x");
  }
  EXPECT_LT(Clock::now() - start, kSlack);
  EXPECT_TRUE(got.empty());
  other.set("late", "value");
  t.join();
  EXPECT_EQ(got, "value");
}

TEST(Store, WaitNamesOnlyTheKeysStillMissing) {
  StoreServer server("127.0.0.1", 0);
  StoreClient client("127.0.0.1", server.port(), quick_options());
  client.set("a", "1");
  try {
    client.wait({"a", "b", "c"}, 200ms);
    FAIL() << "wait with missing keys returned";
  } catch (const Error& e) {
    const std::string msg = e.what();
    const std::string missing_part = msg.substr(msg.find("still missing"));
    EXPECT_THAT(missing_part, HasSubstr("2 of 3 keys: \"b\", \"c\""));
    EXPECT_THAT(missing_part, Not(HasSubstr("\"a\"")));
    EXPECT_THAT(msg, HasSubstr(where(server)));
    EXPECT_THAT(msg, HasSubstr("0.2 s"));
  }
  std::thread t([&] {
    StoreClient setter("127.0.0.1", server.port(), quick_options());
    std::this_thread::sleep_for(50ms);
    setter.set("b", "2");
    std::this_thread::sleep_for(50ms);
    setter.set("c", "3");
  });
  const auto start = Clock::now();
  client.wait({"a", "b", "c"}, 5s);  // released by the second set, not the first
  EXPECT_GE(Clock::now() - start, 90ms);
  t.join();
  client.wait({}, 0ms);  // nothing to wait for
}

TEST(Store, AddCreatesAtZeroAndAccumulates) {
  StoreServer server("127.0.0.1", 0);
  StoreClient client("127.0.0.1", server.port(), quick_options());
  EXPECT_EQ(client.add("n", 5), 5);
  EXPECT_EQ(client.add("n", -7), -2);
  EXPECT_EQ(client.add("n", 0), -2);
  EXPECT_EQ(client.get("n", 1s), "-2");
  client.set("text", "hello");
  try {
    client.add("text", 1);
    FAIL() << "add on a non-integer value returned";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("\"text\""));
    EXPECT_THAT(e.what(), HasSubstr("not a decimal integer"));
  }
  client.set("max", std::to_string(INT64_MAX));
  EXPECT_THROW(client.add("max", 1), Error);
  EXPECT_EQ(client.get("max", 1s), std::to_string(INT64_MAX));  // unchanged
  EXPECT_EQ(client.add("n", 1), -1);  // the connection survives an error reply
}

TEST(Store, CompareSetFollowsTorchSemantics) {
  StoreServer server("127.0.0.1", 0);
  StoreClient client("127.0.0.1", server.port(), quick_options());
  // Missing key, expected non-empty: nothing stored.
  EXPECT_EQ(client.compare_set("k", "x", "y"), "");
  EXPECT_FALSE(client.check({"k"}));
  // Missing key, expected empty: set.
  EXPECT_EQ(client.compare_set("k", "", "first"), "first");
  EXPECT_EQ(client.get("k", 1s), "first");
  // Present, mismatch: unchanged, current value returned.
  EXPECT_EQ(client.compare_set("k", "other", "second"), "first");
  // Present, match: swapped.
  EXPECT_EQ(client.compare_set("k", "first", "second"), "second");
  EXPECT_EQ(client.get("k", 1s), "second");
}

TEST(Store, EraseAndCheck) {
  StoreServer server("127.0.0.1", 0);
  StoreClient client("127.0.0.1", server.port(), quick_options());
  EXPECT_TRUE(client.check({}));
  EXPECT_FALSE(client.check({"a"}));
  client.set("a", "1");
  client.set("b", "2");
  EXPECT_TRUE(client.check({"a", "b"}));
  EXPECT_FALSE(client.check({"a", "b", "c"}));
  EXPECT_TRUE(client.erase("a"));
  EXPECT_FALSE(client.erase("a"));
  EXPECT_FALSE(client.check({"a"}));
  EXPECT_TRUE(client.check({"b"}));
}

TEST(Store, ConcurrentAddsFromManyClientsSumExactly) {
  StoreServer server("127.0.0.1", 0);
  constexpr int kThreads = 32, kAdds = 50;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      try {
        StoreClient client("127.0.0.1", server.port(), quick_options());
        for (int i = 0; i < kAdds; ++i) client.add("counter", t + 1);
      } catch (const Error&) {
        ++failures;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  StoreClient client("127.0.0.1", server.port(), quick_options());
  EXPECT_EQ(client.add("counter", 0), int64_t{kAdds} * kThreads * (kThreads + 1) / 2);
}

TEST(Store, ManyParkedWaitersAreReleasedByOneSet) {
  StoreServer server("127.0.0.1", 0);
  constexpr int kWaiters = 16;
  std::vector<std::thread> threads;
  std::vector<std::string> got(kWaiters);
  std::vector<Clock::time_point> released(kWaiters);
  std::atomic<int> connected{0};
  for (int w = 0; w < kWaiters; ++w)
    threads.emplace_back([&, w] {
      StoreClient client("127.0.0.1", server.port(), quick_options());
      ++connected;
      if (w % 2 == 0) {
        got[w] = client.get("go", 5s);
      } else {
        client.wait({"go"}, 5s);
        got[w] = "released";
      }
      released[w] = Clock::now();
    });
  while (connected.load() < kWaiters) std::this_thread::sleep_for(5ms);
  std::this_thread::sleep_for(100ms);
  StoreClient setter("127.0.0.1", server.port(), quick_options());
  const auto set_at = Clock::now();
  setter.set("go", "now");
  for (auto& t : threads) t.join();
  for (int w = 0; w < kWaiters; ++w) {
    EXPECT_EQ(got[w], w % 2 == 0 ? "now" : "released") << "waiter " << w;
    EXPECT_LT(released[w] - set_at, kSlack) << "waiter " << w;
  }
}

TEST(Store, HandBuiltFramesMatchTheDocumentedFormat) {
  // Guards the malformed-frame test below: a well-formed hand-built frame is answered.
  StoreServer server("127.0.0.1", 0);
  RawConnection raw(server.port());
  raw.send(frame(std::string(1, '\x01') + field("raw") + field("bytes")));  // set
  raw.send(frame(std::string(1, '\x04') + field("n") + le64(41)));          // add
  std::string reply;
  EXPECT_FALSE(raw.closed_by_server(300ms, &reply));
  EXPECT_EQ(reply, frame(std::string(1, '\0')) + frame(std::string(1, '\0') + le64(41)));
  StoreClient client("127.0.0.1", server.port(), quick_options());
  EXPECT_EQ(client.get("raw", 1s), "bytes");
}

TEST(Store, MalformedFramesCloseOnlyTheirConnection) {
  StoreServer server("127.0.0.1", 0);
  StoreClient good("127.0.0.1", server.port(), quick_options());
  good.set("before", "1");
  std::string parked_value;
  std::thread parked([&] {
    StoreClient waiter("127.0.0.1", server.port(), quick_options());
    parked_value = waiter.get("after", 5s);
  });
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"huge length", le32(0x31534D46) + le32(0xFFFFFFF0)},
      {"bad magic", "GET / HTTP/1.1\r\n\r\n"},
      {"unknown op", frame(std::string(1, '\x63'))},
      {"empty body", frame("")},
      {"truncated field", frame(std::string(1, '\x01') + le32(100) + "ab")},
      {"bytes left over", frame(std::string(1, '\x07') + le32(0) + "z")},
      {"list count past the body", frame(std::string(1, '\x07') + le32(0xFFFFFFFF))},
      {"negative timeout", frame(std::string(1, '\x02') + field("k") + le64(-5))},
      {"second request while waiting", frame(std::string(1, '\x02') + field("nokey") + le64(5000)) +
                                           frame(std::string(1, '\x07') + le32(0))},
  };
  for (const auto& [what, bytes] : bad) {
    RawConnection raw(server.port());
    raw.send(bytes);
    EXPECT_TRUE(raw.closed_by_server(2s)) << what;
    // Every other connection keeps working.
    good.set("k", what);
    EXPECT_EQ(good.get("k", 1s), what);
  }
  // A client that hangs up while parked is forgotten without harm.
  {
    RawConnection raw(server.port());
    raw.send(frame(std::string(1, '\x02') + field("after") + le64(5000)));
  }
  good.set("after", "done");
  parked.join();
  EXPECT_EQ(parked_value, "done");
  EXPECT_EQ(good.get("before", 1s), "1");
}

TEST(Store, OversizedRequestFailsClearlyAndTheClientRecovers) {
  StoreServer server("127.0.0.1", 0, /*max_frame_bytes=*/1024);
  StoreClient client("127.0.0.1", server.port(), quick_options());
  try {
    client.set("big", std::string(4096, 'x'));
    FAIL() << "an over-limit frame was accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(where(server)));
    EXPECT_THAT(e.what(), HasSubstr("set(\"big\")"));
  }
  client.set("small", "ok");  // reconnects
  EXPECT_EQ(client.get("small", 1s), "ok");
  EXPECT_FALSE(client.check({"big"}));

  StoreOptions small = quick_options();
  small.max_frame_bytes = 100;
  StoreClient limited("127.0.0.1", server.port(), small);
  try {
    limited.set("k", std::string(200, 'x'));
    FAIL() << "the client sent a frame over its own limit";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("exceeds the frame limit of 100"));
  }
}

TEST(Store, ClientReconnectsAfterTheServerRestartsOnTheSamePort) {
  auto server = std::make_unique<StoreServer>("127.0.0.1", 0);
  const int port = server->port();
  StoreClient client("127.0.0.1", port, quick_options());
  client.set("old", "1");
  server.reset();
  server = std::make_unique<StoreServer>("127.0.0.1", port);
  ASSERT_EQ(server->port(), port);
  client.set("new", "2");  // noticed the closed connection and reconnected
  EXPECT_EQ(client.get("new", 1s), "2");
  EXPECT_FALSE(client.check({"old"}));  // a restarted server starts empty
}

TEST(Store, RequestInFlightWhenTheServerStopsFailsPromptly) {
  auto server = std::make_unique<StoreServer>("127.0.0.1", 0);
  StoreClient client("127.0.0.1", server->port(), quick_options());
  std::string error;
  Clock::time_point failed_at;
  std::thread t([&] {
    try {
      client.get("never", 30s);
    } catch (const Error& e) {
      error = e.what();
      failed_at = Clock::now();
    }
  });
  std::this_thread::sleep_for(100ms);
  const auto stop_at = Clock::now();
  server.reset();  // closes the parked get's connection
  t.join();
  EXPECT_THAT(error, HasSubstr("get(\"never\")"));
  EXPECT_THAT(error, HasSubstr("closed by the store"));
  EXPECT_LT(failed_at - stop_at, kSlack);
}

TEST(Store, ConnectWithoutServerFailsWithinTheConnectTimeout) {
  int port = 0;
  {
    StoreServer probe("127.0.0.1", 0);  // a port that was free a moment ago
    port = probe.port();
  }
  StoreOptions options = quick_options();
  options.connect_timeout = 400ms;
  const auto start = Clock::now();
  try {
    StoreClient client("127.0.0.1", port, options);
    FAIL() << "connected to a port with no server";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(fmt::format("127.0.0.1:{}", port)));
    EXPECT_THAT(e.what(), HasSubstr("0.4 s"));
    EXPECT_THAT(e.what(), HasSubstr("refused"));
  }
  const auto elapsed = Clock::now() - start;
  EXPECT_GE(elapsed, 400ms);  // kept retrying for the whole timeout
  EXPECT_LT(elapsed, 400ms + kSlack);
}

TEST(Store, ServerBindsOnlyTheGivenAddress) {
  const auto refused_on = [](const char* ip, int port) {
    asio::io_context io;
    tcp::socket s(io);
    boost::system::error_code ec;
    s.connect(tcp::endpoint(asio::ip::make_address(ip), static_cast<uint16_t>(port)), ec);
    return ec == asio::error::connection_refused;
  };
  {
    StoreServer server("127.0.0.1", 0);
    EXPECT_EQ(server.address(), "127.0.0.1");
    EXPECT_GT(server.port(), 0);
    EXPECT_FALSE(refused_on("127.0.0.1", server.port()));
    EXPECT_TRUE(refused_on("127.0.0.2", server.port()));  // same loopback, other address
  }
  {
    StoreServer any("0.0.0.0", 0);  // shows 127.0.0.2 is reachable when asked for
    EXPECT_EQ(any.address(), "0.0.0.0");
    EXPECT_FALSE(refused_on("127.0.0.2", any.port()));
  }
}

TEST(Store, ServerRejectsABadAddressOrABusyPort) {
  try {
    StoreServer server("not-an-ip", 0);
    FAIL() << "bound a host name";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("'not-an-ip' is not an IP address"));
  }
  StoreServer first("127.0.0.1", 0);
  try {
    StoreServer second("127.0.0.1", first.port());
    FAIL() << "two servers bound one port";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(fmt::format("cannot bind 127.0.0.1:{}", first.port())));
  }
}

TEST(StoreBarrier, ReleasesEveryRankOnlyAfterAllArrive) {
  StoreServer server("127.0.0.1", 0);
  constexpr int kWorld = 4;
  std::atomic<int> arrived{0};
  std::vector<int> seen(kWorld, -1);
  std::vector<std::thread> ranks;
  for (int r = 0; r < kWorld; ++r)
    ranks.emplace_back([&, r] {
      StoreClient client("127.0.0.1", server.port(), quick_options());
      std::this_thread::sleep_for(std::chrono::milliseconds(30 * r));  // staggered arrivals
      ++arrived;
      store_barrier(client, "init", kWorld, r, 5s);
      seen[r] = arrived.load();
    });
  for (auto& t : ranks) t.join();
  for (int r = 0; r < kWorld; ++r) EXPECT_EQ(seen[r], kWorld) << "rank " << r;
}

TEST(StoreBarrier, TimesOutNamingHowManyArrived) {
  StoreServer server("127.0.0.1", 0);
  StoreClient client("127.0.0.1", server.port(), quick_options());
  try {
    store_barrier(client, "lonely", 3, 1, 200ms);
    FAIL() << "a barrier of 3 released one rank";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("barrier \"lonely\" (rank 1 of 3): 1 of 3 ranks arrived"));
    EXPECT_THAT(e.what(), HasSubstr(where(server)));
  }
  EXPECT_THROW(store_barrier(client, "bad", 2, 2, 200ms), Error);
}

}  // namespace
}  // namespace fm
