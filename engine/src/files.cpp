#include "engine/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "engine/error.h"

namespace fm {

namespace {

std::string errno_text(int err) {
  return std::error_code(err, std::generic_category()).message();
}

// Directory holding `path` ("." for a bare file name).
std::string parent_dir(const std::string& path) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

// Makes a completed rename durable. Some file systems refuse fsync on a
// directory (EINVAL); the data itself is already on disk, so that is not an error.
void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

}  // namespace

std::string read_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  FM_CHECK(fd >= 0, "{}: cannot open ({})", path, errno_text(errno));
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  FM_CHECK(::fstat(fd, &st) == 0, "{}: cannot stat ({})", path, errno_text(errno));
  FM_CHECK(!S_ISDIR(st.st_mode), "{}: cannot open (is a directory)", path);
  std::string out;
  if (S_ISREG(st.st_mode)) out.reserve(static_cast<size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    FM_CHECK(n >= 0, "{}: read failed after {} bytes ({})", path, out.size(), errno_text(errno));
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  AtomicFileWriter w(path);
  w.write(bytes);
  w.commit();
}

void make_dirs(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  FM_CHECK(!ec, "{}: cannot create directory ({})", path, ec.message());
  FM_CHECK(std::filesystem::is_directory(path, ec), "{}: exists and is not a directory", path);
}

AtomicFileWriter::AtomicFileWriter(std::string path)
    : path_(std::move(path)), tmp_path_(path_ + ".tmp." + std::to_string(::getpid())) {
  FM_CHECK(!path_.empty(), "AtomicFileWriter: empty path");
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  FM_CHECK(fd_ >= 0, "{}: cannot create temp file {} ({})", path_, tmp_path_, errno_text(errno));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (!committed_) discard();
}

void AtomicFileWriter::discard() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  ::unlink(tmp_path_.c_str());
}

void AtomicFileWriter::write(const void* data, size_t n) {
  FM_CHECK(fd_ >= 0 && !committed_, "{}: write after commit or failure", path_);
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const size_t chunk =
        std::min<size_t>(n, size_t{1} << 30);  // Linux writes at most ~2 GB per call
    const ssize_t k = ::write(fd_, p, chunk);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) {
      const int err = k < 0 ? errno : EIO;
      discard();
      throw Error(
          fmt::format("{}: write failed after {} bytes ({})", path_, written_, errno_text(err)));
    }
    p += k;
    n -= static_cast<size_t>(k);
    written_ += static_cast<size_t>(k);
  }
}

void AtomicFileWriter::commit() {
  FM_CHECK(fd_ >= 0 && !committed_, "{}: commit after commit or failure", path_);
  auto fail = [&](const char* what) {
    const int err = errno;
    discard();
    throw Error(fmt::format("{}: {} failed ({})", path_, what, errno_text(err)));
  };
  if (::fsync(fd_) != 0) fail("fsync");
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) fail("close");
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) fail("rename of the temp file");
  committed_ = true;
  fsync_dir(parent_dir(path_));
}

}  // namespace fm
