#include "engine/checksum.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <system_error>
#include <vector>

#include "engine/error.h"

namespace fm {

namespace {

// One SHA-256 computation over EVP; update() may be called any number of times.
class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new(), &EVP_MD_CTX_free) {
    FM_CHECK(ctx_ != nullptr && EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr) == 1,
             "sha256: OpenSSL EVP initialisation failed");
  }
  void update(const void* data, size_t n) {
    FM_CHECK(EVP_DigestUpdate(ctx_.get(), data, n) == 1, "sha256: EVP_DigestUpdate failed");
  }
  std::string hex() {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    FM_CHECK(EVP_DigestFinal_ex(ctx_.get(), digest, &len) == 1, "sha256: EVP_DigestFinal failed");
    static constexpr char kHex[] = "0123456789abcdef";
    std::string out;
    out.reserve(2 * len);
    for (unsigned int i = 0; i < len; ++i) {
      out += kHex[digest[i] >> 4];
      out += kHex[digest[i] & 15];
    }
    return out;
  }

 private:
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx_;
};

}  // namespace

std::string sha256_hex(const void* data, size_t n) {
  Sha256 h;
  h.update(data, n);
  return h.hex();
}

std::string sha256_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  FM_CHECK(fd >= 0, "{}: cannot open for sha256 ({})", path,
           std::error_code(errno, std::generic_category()).message());
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  Sha256 h;
  std::vector<char> buf(size_t{1} << 20);
  size_t total = 0;
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    FM_CHECK(n >= 0, "{}: read failed after {} bytes while hashing ({})", path, total,
             std::error_code(errno, std::generic_category()).message());
    if (n == 0) break;
    h.update(buf.data(), static_cast<size_t>(n));
    total += static_cast<size_t>(n);
  }
  return h.hex();
}

}  // namespace fm
