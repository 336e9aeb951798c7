#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <nlohmann/json.hpp>
#include <set>
#include <system_error>
#include <tuple>

#include "engine/error.h"
#include "engine/files.h"

namespace fm {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this engine assumes a little-endian host");

namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the reference implementation's limit
constexpr size_t kMaxHeaderDepth = 8;               // a valid header nests 3 deep

std::string errno_text(int err) {
  return std::error_code(err, std::generic_category()).message();
}

// An open file descriptor, closed on scope exit.
class Fd {
 public:
  explicit Fd(const std::string& path) : fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    FM_CHECK(fd_ >= 0, "{}: cannot open ({})", path, errno_text(errno));
  }
  ~Fd() { ::close(fd_); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// Reads exactly n bytes at `offset`; returns false on a short read (end of file).
bool pread_exact(int fd, void* dst, uint64_t n, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(dst);
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, uint64_t{1} << 30));
    const ssize_t k = ::pread(fd, p, chunk, static_cast<off_t>(offset));
    if (k < 0 && errno == EINTR) continue;
    FM_CHECK(k >= 0, "{}: read failed at offset {} ({})", path, offset, errno_text(errno));
    if (k == 0) return false;
    p += k;
    n -= static_cast<uint64_t>(k);
    offset += static_cast<uint64_t>(k);
  }
  return true;
}

// Parses the header, rejecting duplicate keys (ambiguous tensors) and absurd nesting
// before the parser builds anything from it.
json parse_header(const std::string& text, const std::string& path) {
  std::vector<std::set<std::string>> open_objects;  // keys seen per open object
  std::vector<bool> is_object;                      // the open containers, innermost last
  auto check = [&](int, json::parse_event_t event, json& parsed) -> bool {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        FM_CHECK(is_object.size() < kMaxHeaderDepth,
                 "{}: header nests deeper than {} levels (not a safetensors header)", path,
                 kMaxHeaderDepth);
        is_object.push_back(event == json::parse_event_t::object_start);
        if (is_object.back()) open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!is_object.empty() && is_object.back()) open_objects.pop_back();
        if (!is_object.empty()) is_object.pop_back();
        break;
      case json::parse_event_t::key:
        if (!open_objects.empty() && parsed.is_string()) {
          const auto& key = parsed.get_ref<const std::string&>();
          FM_CHECK(open_objects.back().insert(key).second, "{}: header has duplicate key '{}'",
                   path, key);
        }
        break;
      case json::parse_event_t::value:
        break;
    }
    return true;
  };
  try {
    return json::parse(text, check);
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: header is not valid JSON: {}", path, e.what()));
  }
}

std::string brief(const json& j) {
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

// Validates one tensor entry of the header against a data buffer of data_size bytes.
SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const json& j,
                             uint64_t data_size) {
  const std::string where = fmt::format("{}: tensor '{}'", path, name);
  FM_CHECK(j.is_object(), "{}: entry must be a JSON object (got {})", where, brief(j));
  for (const auto& [key, value] : j.items()) {
    (void)value;
    FM_CHECK(key == "dtype" || key == "shape" || key == "data_offsets",
             "{}: unexpected field '{}' (expected dtype, shape, data_offsets)", where, key);
  }
  for (const char* field : {"dtype", "shape", "data_offsets"})
    FM_CHECK(j.contains(field), "{}: missing '{}'", where, field);

  SafetensorsEntry e;
  e.name = name;
  const json& dtype = j["dtype"];
  FM_CHECK(dtype.is_string(), "{}: 'dtype' must be a string (got {})", where, brief(dtype));
  FM_CHECK(dtype_from_safetensors_name(dtype.get_ref<const std::string&>(), &e.dtype),
           "{}: unknown dtype '{}' (this engine reads F32, F64, BF16, F16, I32, I64, U8, U16)",
           where, dtype.get_ref<const std::string&>());

  const json& shape = j["shape"];
  FM_CHECK(shape.is_array(), "{}: 'shape' must be a list of non-negative integers (got {})", where,
           brief(shape));
  uint64_t nbytes = dtype_size(e.dtype);
  bool overflow = false;
  for (const json& d : shape) {
    FM_CHECK(d.is_number_unsigned() && d.get<uint64_t>() <= uint64_t{INT64_MAX},
             "{}: 'shape' must be a list of non-negative integers (got {})", where, brief(shape));
    const uint64_t dim = d.get<uint64_t>();
    overflow = overflow || __builtin_mul_overflow(nbytes, dim, &nbytes);
    e.shape.push_back(static_cast<int64_t>(dim));
  }

  const json& offs = j["data_offsets"];
  FM_CHECK(offs.is_array() && offs.size() == 2 && offs[0].is_number_unsigned() &&
               offs[1].is_number_unsigned() && offs[0].get<uint64_t>() <= offs[1].get<uint64_t>(),
           "{}: 'data_offsets' must be two non-negative integers [begin, end] with begin <= end "
           "(got {})",
           where, brief(offs));
  e.begin = offs[0].get<uint64_t>();
  e.end = offs[1].get<uint64_t>();
  FM_CHECK(e.end <= data_size,
           "{}: data_offsets [{}, {}] end beyond the data size ({} bytes; file truncated?)", where,
           e.begin, e.end, data_size);
  FM_CHECK(!overflow && nbytes == e.end - e.begin,
           "{}: dtype/shape mismatch: {}{} needs {} bytes but data_offsets [{}, {}] span {}", where,
           dtype_safetensors_name(e.dtype), shape_str(e.shape),
           overflow ? std::string("more than 2^64") : std::to_string(nbytes), e.begin, e.end,
           e.end - e.begin);
  return e;
}

}  // namespace

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  Fd fd(path);
  struct stat st {};
  FM_CHECK(::fstat(fd.get(), &st) == 0, "{}: cannot stat ({})", path, errno_text(errno));
  FM_CHECK(S_ISREG(st.st_mode), "{}: not a regular file", path);
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  FM_CHECK(file_size >= 8,
           "{}: file is {} bytes, shorter than the 8-byte header length (truncated header)", path,
           file_size);

  unsigned char len_bytes[8];
  FM_CHECK(pread_exact(fd.get(), len_bytes, 8, 0, path), "{}: truncated header", path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  FM_CHECK(header_len <= kMaxHeaderBytes,
           "{}: header length {} is larger than the {} byte limit (not a safetensors file?)", path,
           header_len, kMaxHeaderBytes);
  FM_CHECK(header_len <= file_size - 8,
           "{}: header length {} exceeds the file size ({} bytes after the 8-byte length; "
           "truncated header)",
           path, header_len, file_size - 8);

  std::string text(static_cast<size_t>(header_len), '\0');
  FM_CHECK(pread_exact(fd.get(), text.data(), header_len, 8, path),
           "{}: truncated header (file shrank while reading)", path);
  const json header = parse_header(text, path);
  FM_CHECK(header.is_object(), "{}: header is not a JSON object (got {})", path, brief(header));

  SafetensorsFile f;
  f.path_ = path;
  f.data_start_ = 8 + header_len;
  const uint64_t data_size = file_size - f.data_start_;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      FM_CHECK(value.is_object(), "{}: __metadata__ must be an object of strings (got {})", path,
               brief(value));
      for (const auto& [key, v] : value.items()) {
        FM_CHECK(v.is_string(), "{}: __metadata__ value for '{}' must be a string (got {})", path,
                 key, brief(v));
        f.metadata_[key] = v.get<std::string>();
      }
      continue;
    }
    f.entries_.push_back(parse_entry(path, name, value, data_size));
  }

  std::sort(f.entries_.begin(), f.entries_.end(), [](const auto& a, const auto& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  // Empty tensors occupy no bytes and cannot overlap; compare each tensor with the
  // non-empty tensor reaching furthest so far.
  const SafetensorsEntry* furthest = nullptr;
  for (const SafetensorsEntry& e : f.entries_) {
    if (e.begin == e.end) continue;
    FM_CHECK(furthest == nullptr || e.begin >= furthest->end,
             "{}: overlapping tensors: '{}' [{}, {}) and '{}' [{}, {})", path, furthest->name,
             furthest->begin, furthest->end, e.name, e.begin, e.end);
    if (furthest == nullptr || e.end > furthest->end) furthest = &e;
  }
  for (size_t i = 0; i < f.entries_.size(); ++i) f.index_[f.entries_[i].name] = i;
  return f;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const SafetensorsEntry& e : entries_) out.push_back(e.name);
  return out;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  const auto it = index_.find(name);
  FM_CHECK(it != index_.end(), "{}: no tensor named '{}'", path_, name);
  return entries_[it->second];
}

Tensor SafetensorsFile::load(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  Tensor t = Tensor::empty(e.shape, e.dtype);
  load_into(name, t);
  return t;
}

void SafetensorsFile::load_into(const std::string& name, Tensor& dst) const {
  const SafetensorsEntry& e = entry(name);
  FM_CHECK(dst.defined() && dst.is_cpu(),
           "{}: tensor '{}': load_into needs a CPU destination tensor (got {})", path_, name,
           dst.defined() ? dst.describe() : std::string("an undefined tensor"));
  FM_CHECK(dst.dtype() == e.dtype && dst.shape() == e.shape,
           "{}: tensor '{}': expected {}{} (the destination), found {}{} in the file", path_, name,
           dtype_name(dst.dtype()), shape_str(dst.shape()), dtype_name(e.dtype),
           shape_str(e.shape));
  if (e.end == e.begin) return;
  Fd fd(path_);
  FM_CHECK(pread_exact(fd.get(), dst.raw(), e.end - e.begin, data_start_ + e.begin, path_),
           "{}: tensor '{}': unexpected end of file reading data_offsets [{}, {}] (file changed "
           "since it was opened?)",
           path_, name, e.begin, e.end);
}

std::string safetensors_prefix(std::string header_json) {
  while ((8 + header_json.size()) % 8 != 0) header_json += ' ';  // 8-byte aligned data
  std::string out(8, '\0');
  uint64_t len = header_json.size();
  for (char& b : out) {
    b = static_cast<char>(len & 0xff);
    len >>= 8;
  }
  return out + header_json;
}

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::set<std::string> seen;
  for (const NamedTensor& nt : tensors) {
    FM_CHECK(!nt.name.empty(), "{}: cannot write a tensor with an empty name", path);
    FM_CHECK(nt.name != "__metadata__", "{}: '__metadata__' is reserved, not a tensor name", path);
    FM_CHECK(seen.insert(nt.name).second, "{}: duplicate tensor name '{}'", path, nt.name);
    FM_CHECK(nt.tensor.defined(), "{}: tensor '{}' is undefined", path, nt.name);
    FM_CHECK(nt.tensor.is_cpu(), "{}: tensor '{}' is {}; only CPU tensors can be written", path,
             nt.name, nt.tensor.describe());
  }

  // Largest elements first keeps every tensor aligned to its element size in the file.
  std::vector<const NamedTensor*> order;
  for (const NamedTensor& nt : tensors) order.push_back(&nt);
  std::stable_sort(order.begin(), order.end(), [](const NamedTensor* a, const NamedTensor* b) {
    return dtype_size(a->tensor.dtype()) > dtype_size(b->tensor.dtype());
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const NamedTensor* nt : order) {
    const uint64_t n = nt->tensor.nbytes();
    header[nt->name] = {{"dtype", dtype_safetensors_name(nt->tensor.dtype())},
                        {"shape", nt->tensor.shape()},
                        {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::ordered_json::exception& e) {
    throw Error(
        fmt::format("{}: tensor names and metadata must be valid UTF-8 ({})", path, e.what()));
  }
  AtomicFileWriter w(path);
  w.write(safetensors_prefix(std::move(text)));
  for (const NamedTensor* nt : order) w.write(nt->tensor.raw(), nt->tensor.nbytes());
  w.commit();
}

}  // namespace fm
