// ConfigNode: the one way YAML config becomes typed structs. A struct loader
// reads each knob with get<T>() / get_positive() / get_choice() ..., and the
// root's finish() then rejects every key nobody read, so a typo is an error
// rather than a silently ignored setting. Every message names the file, the
// dotted key path and what was expected:
//   "configs/tiny.yaml: model.hidden: expected an integer, got 'abc' (line 4)"
//
// Scalars are typed strictly (YAML 1.2 core schema): integers are decimal or
// 0x hex; a float for an integer key, a quoted "64" for a number key, or
// yes/no for a boolean are errors. A key set to null (`key:` or `key: ~`)
// counts as absent: get(key, fallback) returns the fallback, get(key) fails.
#pragma once

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "engine/error.h"  // fm::Error, and fmt for the messages loaders pass to fail()

namespace fm {

template <class T>
concept ConfigValue =
    std::is_same_v<T, bool> || std::is_same_v<T, int> || std::is_same_v<T, int64_t> ||
    std::is_same_v<T, uint64_t> || std::is_same_v<T, float> || std::is_same_v<T, double> ||
    std::is_same_v<T, std::string> || std::is_same_v<T, std::vector<int64_t>> ||
    std::is_same_v<T, std::vector<double>> || std::is_same_v<T, std::vector<std::string>>;

class ConfigNode {
 public:
  ConfigNode(const ConfigNode&) = default;
  ConfigNode& operator=(const ConfigNode& other);  // rebinds (YAML::Node's operator= would not)

  // Errors: "<path>: cannot open (...)", "<path>:<line>:<col>: YAML syntax error: ...".
  static ConfigNode load_file(const std::string& path);
  // `origin` stands for the file name in messages (e.g. "<embedded tiny.yaml>").
  static ConfigNode parse(const std::string& yaml_text, const std::string& origin);

  // True when the key is present with a non-null value. Does not mark it read.
  bool has(const std::string& key) const;
  // True when the key is present and its value is a mapping (a sub-section). Does not mark it read.
  bool is_mapping(const std::string& key) const;
  // A required key.
  template <ConfigValue T>
  T get(const std::string& key) const;
  // An optional key with a documented default (also used when the value is null).
  template <ConfigValue T>
  T get(const std::string& key, const T& fallback) const;

  ConfigNode child(const std::string& key) const;           // required sub-mapping
  ConfigNode child_or_empty(const std::string& key) const;  // optional (empty if absent or null)
  std::vector<std::string> keys() const;                    // in file order

  // Throws one line per key under this node (recursing into children obtained from it)
  // that was never read: "<file>: model.hiden: unknown key (line 3; did you mean 'hidden'?)".
  // Call once on the root (or the subtree a loader owns) after reading.
  void finish() const;
  // Throws "<file>: <dotted.path.key>: <problem>" (plus the key's line when it is present).
  // `key` may itself be dotted ("router_balance.eta").
  [[noreturn]] void fail(const std::string& key, const std::string& problem) const;
  std::string key_path(const std::string& key) const;  // "model.router.alpha"
  const std::string& origin() const;
  const std::string& path() const { return prefix_; }  // this node's dotted path ("" at the root)

  // Range helpers: get + check, e.g. "<file>: model.hidden: must be > 0 (got -3)".
  int64_t get_positive(const std::string& key) const;  // required
  // Optional; inclusive bounds: "must be in [0, 1] (got 1.5)".
  double get_in_range(const std::string& key, double lo, double hi, double fallback) const;
  // Optional: "must be one of none, switch_aux, ... (got 'foo')".
  std::string get_choice(const std::string& key, const std::vector<std::string>& allowed,
                         const std::string& fallback) const;

 private:
  struct Shared {
    std::string origin;
    std::set<std::string> used;   // dotted paths read (or descended into)
    std::set<std::string> asked;  // dotted paths the code asked about, present or not
  };

  ConfigNode(std::shared_ptr<Shared> shared, YAML::Node node, std::string prefix);
  // The value under `key` (nullopt if absent); records the key as asked about.
  std::optional<YAML::Node> lookup(const std::string& key) const;
  void mark_used(const std::string& key) const;
  ConfigNode make_child(const std::string& key, bool required) const;
  void collect_unknown(const YAML::Node& node, const std::string& prefix,
                       std::vector<std::string>& out) const;

  std::shared_ptr<Shared> shared_;
  YAML::Node node_;  // a mapping (possibly empty)
  std::string prefix_;
};

}  // namespace fm
