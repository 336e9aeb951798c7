#include "engine/config.h"

#include <algorithm>
#include <cerrno>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <map>
#include <string_view>

#include "engine/error.h"
#include "engine/files.h"

namespace fm {

namespace {

std::string join_path(const std::string& prefix, const std::string& key) {
  return prefix.empty() ? key : prefix + "." + key;
}

bool is_quoted(const YAML::Node& v) {
  return v.Tag() == "!" || v.Tag() == "tag:yaml.org,2002:str";
}

// What a value is, for "expected X, got Y" messages.
std::string found(const YAML::Node& v) {
  switch (v.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return "null";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a mapping";
    case YAML::NodeType::Scalar:
      break;
  }
  std::string s = v.Scalar();
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return is_quoted(v) ? fmt::format("the quoted string '{}'", s) : fmt::format("'{}'", s);
}

int line_of(const YAML::Node& n) {
  return n.Mark().is_null() ? 0 : n.Mark().line + 1;
}

// The key node for `key` in mapping `map`, if present.
std::optional<YAML::Node> find_key(const YAML::Node& map, std::string_view key) {
  if (!map.IsMap()) return std::nullopt;
  for (const auto& kv : map)
    if (kv.first.IsScalar() && kv.first.Scalar() == key) return kv.first;
  return std::nullopt;
}

// Levenshtein distance, for "did you mean" hints.
size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// YAML 1.2 core-schema integers: [-+]? then decimal digits, 0x hex or 0o octal.
enum class IntParse { ok, not_integer, overflow };
IntParse parse_integer(std::string_view s, bool* negative, uint64_t* magnitude) {
  *negative = false;
  *magnitude = 0;
  if (!s.empty() && (s[0] == '+' || s[0] == '-')) {
    *negative = s[0] == '-';
    s.remove_prefix(1);
  }
  unsigned base = 10;
  if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'o')) {
    base = s[1] == 'x' ? 16 : 8;
    s.remove_prefix(2);
  }
  if (s.empty()) return IntParse::not_integer;
  uint64_t v = 0;
  bool overflow = false;
  for (char c : s) {
    unsigned d;
    if (c >= '0' && c <= '9')
      d = static_cast<unsigned>(c - '0');
    else if (base == 16 && c >= 'a' && c <= 'f')
      d = static_cast<unsigned>(c - 'a' + 10);
    else if (base == 16 && c >= 'A' && c <= 'F')
      d = static_cast<unsigned>(c - 'A' + 10);
    else
      return IntParse::not_integer;
    if (d >= base) return IntParse::not_integer;
    overflow = overflow || __builtin_mul_overflow(v, base, &v) || __builtin_add_overflow(v, d, &v);
  }
  *magnitude = v;
  return overflow ? IntParse::overflow : IntParse::ok;
}

// YAML 1.2 core-schema floats: [-+]?(.[0-9]+|[0-9]+(.[0-9]*)?)([eE][-+]?[0-9]+)? and
// [-+]?.inf. NaN is rejected: no knob has a meaningful NaN value.
bool parse_float(const std::string& text, double* out) {
  std::string_view s = text;
  bool negative = false;
  if (!s.empty() && (s[0] == '+' || s[0] == '-')) {
    negative = s[0] == '-';
    s.remove_prefix(1);
  }
  if (s == ".inf" || s == ".Inf" || s == ".INF") {
    *out = negative ? -HUGE_VAL : HUGE_VAL;
    return true;
  }
  size_t i = 0, int_digits = 0, frac_digits = 0;
  auto digits = [&] {
    size_t n = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i, ++n;
    return n;
  };
  int_digits = digits();
  if (i < s.size() && s[i] == '.') {
    ++i;
    frac_digits = digits();
  }
  if (int_digits == 0 && frac_digits == 0) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    if (digits() == 0) return false;
  }
  if (i != s.size()) return false;
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (errno == ERANGE && std::isinf(v)) return false;  // 1e999: out of range
  *out = v;
  return true;
}

template <class T>
struct Convert;

int64_t to_int64(const YAML::Node& v, const ConfigNode& c, const std::string& key, int64_t lo,
                 int64_t hi, const char* what) {
  if (!v.IsScalar() || is_quoted(v))
    c.fail(key, fmt::format("expected {}, got {}", what, found(v)));
  bool negative;
  uint64_t mag;
  const IntParse r = parse_integer(v.Scalar(), &negative, &mag);
  if (r == IntParse::not_integer) c.fail(key, fmt::format("expected {}, got {}", what, found(v)));
  const bool fits = r == IntParse::ok &&
                    (negative ? mag <= uint64_t{1} << 63 : mag <= static_cast<uint64_t>(INT64_MAX));
  const int64_t value = !fits      ? 0
                        : negative ? static_cast<int64_t>(0 - mag)
                                   : static_cast<int64_t>(mag);
  if (!fits || value < lo || value > hi)
    c.fail(key, fmt::format("{} out of range [{}, {}] for {}", v.Scalar(), lo, hi, what));
  return value;
}

template <>
struct Convert<bool> {
  static constexpr const char* what = "a boolean (true or false)";
  static bool from(const YAML::Node& v, const ConfigNode& c, const std::string& key) {
    if (v.IsScalar() && !is_quoted(v)) {
      const std::string& s = v.Scalar();
      if (s == "true" || s == "True" || s == "TRUE") return true;
      if (s == "false" || s == "False" || s == "FALSE") return false;
    }
    c.fail(key, fmt::format("expected {}, got {}", what, found(v)));
  }
};

template <>
struct Convert<int64_t> {
  static constexpr const char* what = "an integer";
  static int64_t from(const YAML::Node& v, const ConfigNode& c, const std::string& key) {
    return to_int64(v, c, key, INT64_MIN, INT64_MAX, what);
  }
};

template <>
struct Convert<int> {
  static constexpr const char* what = "an integer";
  static int from(const YAML::Node& v, const ConfigNode& c, const std::string& key) {
    return static_cast<int>(to_int64(v, c, key, INT32_MIN, INT32_MAX, what));
  }
};

template <>
struct Convert<uint64_t> {
  static constexpr const char* what = "a non-negative integer";
  static uint64_t from(const YAML::Node& v, const ConfigNode& c, const std::string& key) {
    if (!v.IsScalar() || is_quoted(v))
      c.fail(key, fmt::format("expected {}, got {}", what, found(v)));
    bool negative;
    uint64_t mag;
    const IntParse r = parse_integer(v.Scalar(), &negative, &mag);
    if (r == IntParse::not_integer || (negative && mag != 0))
      c.fail(key, fmt::format("expected {}, got {}", what, found(v)));
    if (r == IntParse::overflow)
      c.fail(key, fmt::format("{} out of range [0, {}]", v.Scalar(), UINT64_MAX));
    return mag;
  }
};

template <>
struct Convert<double> {
  static constexpr const char* what = "a number";
  static double from(const YAML::Node& v, const ConfigNode& c, const std::string& key) {
    double d = 0;
    if (!v.IsScalar() || is_quoted(v) || !parse_float(v.Scalar(), &d))
      c.fail(key, fmt::format("expected {}, got {}", what, found(v)));
    return d;
  }
};

template <>
struct Convert<float> {
  static constexpr const char* what = "a number";
  static float from(const YAML::Node& v, const ConfigNode& c, const std::string& key) {
    const double d = Convert<double>::from(v, c, key);
    if (std::isfinite(d) && std::fabs(d) > FLT_MAX)
      c.fail(key, fmt::format("{} out of range for a 32-bit float", v.Scalar()));
    return static_cast<float>(d);
  }
};

template <>
struct Convert<std::string> {
  static constexpr const char* what = "a string";
  static std::string from(const YAML::Node& v, const ConfigNode& c, const std::string& key) {
    if (!v.IsScalar()) c.fail(key, fmt::format("expected {}, got {}", what, found(v)));
    return v.Scalar();
  }
};

template <class E>
struct Convert<std::vector<E>> {
  static constexpr const char* what = std::is_same_v<E, std::string> ? "a list of strings"
                                      : std::is_same_v<E, double>    ? "a list of numbers"
                                                                     : "a list of integers";
  static std::vector<E> from(const YAML::Node& v, const ConfigNode& c, const std::string& key) {
    if (!v.IsSequence()) c.fail(key, fmt::format("expected {}, got {}", what, found(v)));
    std::vector<E> out;
    out.reserve(v.size());
    size_t i = 0;
    for (const auto& item : v) {
      out.push_back(Convert<E>::from(item, c, fmt::format("{}[{}]", key, i)));
      ++i;
    }
    return out;
  }
};

}  // namespace

ConfigNode::ConfigNode(std::shared_ptr<Shared> shared, YAML::Node node, std::string prefix)
    : shared_(std::move(shared)), node_(std::move(node)), prefix_(std::move(prefix)) {}

// YAML::Node::operator= writes through to the tree the node refers to; rebind instead.
ConfigNode& ConfigNode::operator=(const ConfigNode& other) {
  shared_ = other.shared_;
  node_.reset(other.node_);
  prefix_ = other.prefix_;
  return *this;
}

ConfigNode ConfigNode::load_file(const std::string& path) {
  return parse(read_file(path), path);
}

namespace {

// Every mapping key must be a plain scalar and appear once (yaml-cpp keeps duplicates).
void check_keys(const YAML::Node& node, const std::string& prefix, const std::string& origin) {
  if (node.IsSequence()) {
    size_t i = 0;
    for (const auto& item : node) check_keys(item, fmt::format("{}[{}]", prefix, i++), origin);
    return;
  }
  if (!node.IsMap()) return;
  std::map<std::string, int> lines;
  for (const auto& kv : node) {
    FM_CHECK(kv.first.IsScalar(), "{}: {}: mapping keys must be plain strings (line {})", origin,
             prefix.empty() ? "<top level>" : prefix, line_of(kv.first));
    const std::string path = join_path(prefix, kv.first.Scalar());
    const auto [it, inserted] = lines.emplace(kv.first.Scalar(), line_of(kv.first));
    FM_CHECK(inserted, "{}: {}: duplicate key (lines {} and {})", origin, path, it->second,
             line_of(kv.first));
    check_keys(kv.second, path, origin);
  }
}

}  // namespace

ConfigNode ConfigNode::parse(const std::string& yaml_text, const std::string& origin) {
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(yaml_text);
  } catch (const YAML::ParserException& e) {
    throw Error(fmt::format("{}:{}:{}: YAML syntax error: {}", origin, e.mark.line + 1,
                            e.mark.column + 1, e.msg));
  } catch (const YAML::Exception& e) {
    throw Error(fmt::format("{}: YAML error: {}", origin, e.what()));
  }
  FM_CHECK(docs.size() <= 1, "{}: expected one YAML document, found {}", origin, docs.size());
  YAML::Node root = docs.empty() || docs[0].IsNull() ? YAML::Node(YAML::NodeType::Map) : docs[0];
  FM_CHECK(root.IsMap(), "{}: the top level must be a mapping of keys, got {}", origin,
           found(root));
  check_keys(root, "", origin);
  auto shared = std::make_shared<Shared>();
  shared->origin = origin;
  return ConfigNode(std::move(shared), root, "");
}

std::optional<YAML::Node> ConfigNode::lookup(const std::string& key) const {
  shared_->asked.insert(key_path(key));
  for (const auto& kv : node_)
    if (kv.first.Scalar() == key) return kv.second;
  return std::nullopt;
}

void ConfigNode::mark_used(const std::string& key) const {
  shared_->used.insert(key_path(key));
}

bool ConfigNode::has(const std::string& key) const {
  const auto v = lookup(key);
  return v && !v->IsNull();
}

bool ConfigNode::is_mapping(const std::string& key) const {
  const auto v = lookup(key);
  return v && v->IsMap();
}

template <ConfigValue T>
T ConfigNode::get(const std::string& key) const {
  const auto v = lookup(key);
  if (!v) fail(key, fmt::format("required key is missing (expected {})", Convert<T>::what));
  mark_used(key);
  return Convert<T>::from(*v, *this, key);
}

template <ConfigValue T>
T ConfigNode::get(const std::string& key, const T& fallback) const {
  const auto v = lookup(key);
  if (!v) return fallback;
  mark_used(key);
  if (v->IsNull()) return fallback;
  return Convert<T>::from(*v, *this, key);
}

#define FM_CONFIG_INSTANTIATE(T)                           \
  template T ConfigNode::get<T>(const std::string&) const; \
  template T ConfigNode::get<T>(const std::string&, const T&) const;
FM_CONFIG_INSTANTIATE(bool)
FM_CONFIG_INSTANTIATE(int)
FM_CONFIG_INSTANTIATE(int64_t)
FM_CONFIG_INSTANTIATE(uint64_t)
FM_CONFIG_INSTANTIATE(float)
FM_CONFIG_INSTANTIATE(double)
FM_CONFIG_INSTANTIATE(std::string)
FM_CONFIG_INSTANTIATE(std::vector<int64_t>)
FM_CONFIG_INSTANTIATE(std::vector<double>)
FM_CONFIG_INSTANTIATE(std::vector<std::string>)
#undef FM_CONFIG_INSTANTIATE

ConfigNode ConfigNode::make_child(const std::string& key, bool required) const {
  const auto v = lookup(key);
  if (v) mark_used(key);
  if (!v || v->IsNull()) {
    if (required)
      fail(key,
           v ? "expected a mapping, got null" : "required section is missing (expected a mapping)");
    return ConfigNode(shared_, YAML::Node(YAML::NodeType::Map), key_path(key));
  }
  if (!v->IsMap()) fail(key, fmt::format("expected a mapping, got {}", found(*v)));
  return ConfigNode(shared_, *v, key_path(key));
}

ConfigNode ConfigNode::child(const std::string& key) const {
  return make_child(key, true);
}

ConfigNode ConfigNode::child_or_empty(const std::string& key) const {
  return make_child(key, false);
}

std::vector<std::string> ConfigNode::keys() const {
  std::vector<std::string> out;
  for (const auto& kv : node_) out.push_back(kv.first.Scalar());
  return out;
}

void ConfigNode::collect_unknown(const YAML::Node& node, const std::string& prefix,
                                 std::vector<std::string>& out) const {
  for (const auto& kv : node) {
    const std::string path = join_path(prefix, kv.first.Scalar());
    if (shared_->used.count(path)) {
      if (kv.second.IsMap()) collect_unknown(kv.second, path, out);
      continue;
    }
    // Suggest the closest key the code asked for under the same parent.
    std::string hint;
    size_t best = 3;  // suggest only within two edits
    const std::string parent = prefix.empty() ? "" : prefix + ".";
    for (const std::string& asked : shared_->asked) {
      if (asked.compare(0, parent.size(), parent) != 0) continue;
      const std::string_view leaf = std::string_view(asked).substr(parent.size());
      if (leaf.find('.') != std::string_view::npos || find_key(node, leaf)) continue;
      const size_t d = edit_distance(leaf, kv.first.Scalar());
      if (d < best) {
        best = d;
        hint = fmt::format("; did you mean '{}'?", leaf);
      }
    }
    out.push_back(fmt::format("{}: {}: unknown key (line {}{})", shared_->origin, path,
                              line_of(kv.first), hint));
  }
}

void ConfigNode::finish() const {
  std::vector<std::string> unknown;
  collect_unknown(node_, prefix_, unknown);
  if (unknown.empty()) return;
  std::string msg;
  for (const std::string& line : unknown) msg += (msg.empty() ? "" : "\n") + line;
  throw Error(msg);
}

void ConfigNode::fail(const std::string& key, const std::string& problem) const {
  // Find the key's line: descend through dotted components, ignoring "[i]" suffixes.
  int line = 0;
  YAML::Node node = node_;
  size_t start = 0;
  while (node.IsMap()) {
    const size_t dot = key.find('.', start);
    std::string part =
        key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    part = part.substr(0, part.find('['));
    const auto k = find_key(node, part);
    if (!k) break;
    if (dot == std::string::npos) {
      line = line_of(*k);
      break;
    }
    for (const auto& kv : node)
      if (kv.first.Scalar() == part) node.reset(kv.second);  // rebind; operator= would write
    start = dot + 1;
  }
  if (line > 0)
    throw Error(fmt::format("{}: {}: {} (line {})", shared_->origin, key_path(key), problem, line));
  throw Error(fmt::format("{}: {}: {}", shared_->origin, key_path(key), problem));
}

std::string ConfigNode::key_path(const std::string& key) const {
  return join_path(prefix_, key);
}

const std::string& ConfigNode::origin() const {
  return shared_->origin;
}

int64_t ConfigNode::get_positive(const std::string& key) const {
  const int64_t v = get<int64_t>(key);
  if (v <= 0) fail(key, fmt::format("must be > 0 (got {})", v));
  return v;
}

double ConfigNode::get_in_range(const std::string& key, double lo, double hi,
                                double fallback) const {
  const double v = get<double>(key, fallback);
  if (!(v >= lo && v <= hi)) fail(key, fmt::format("must be in [{}, {}] (got {})", lo, hi, v));
  return v;
}

std::string ConfigNode::get_choice(const std::string& key, const std::vector<std::string>& allowed,
                                   const std::string& fallback) const {
  std::string list;
  for (const std::string& a : allowed) list += (list.empty() ? "" : ", ") + a;
  FM_CHECK(std::find(allowed.begin(), allowed.end(), fallback) != allowed.end(),
           "get_choice({}): the fallback '{}' is not one of {}", key_path(key), fallback, list);
  const std::string v = get<std::string>(key, fallback);
  if (std::find(allowed.begin(), allowed.end(), v) == allowed.end())
    fail(key, fmt::format("must be one of {} (got '{}')", list, v));
  return v;
}

}  // namespace fm
