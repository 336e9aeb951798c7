#include "tokenizer/tokenizer.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sentencepiece_processor.h>

#include <map>
#include <mutex>

#include "engine/error.h"
#include "engine/files.h"
#include "tokenizer/src/embedded_models.h"

namespace fm {

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::string serialized;
};

Tokenizer::Tokenizer(std::shared_ptr<const Impl> impl, std::string origin)
    : impl_(std::move(impl)), origin_(std::move(origin)) {}

Tokenizer Tokenizer::load(const std::string& path) {
  return from_serialized(read_file(path), path);
}

Tokenizer Tokenizer::from_serialized(std::string bytes, std::string origin) {
  FM_CHECK(!bytes.empty(), "{}: not a SentencePiece model (empty)", origin);
  auto impl = std::make_shared<Impl>();
  const auto status = impl->sp.LoadFromSerializedProto(bytes);
  FM_CHECK(status.ok(), "{}: not a SentencePiece model ({})", origin, status.ToString());
  // Every foremoe tokenizer has the same special ids (see tokenizer.h); a model
  // trained elsewhere with other ids would silently mislabel bos/eos.
  const auto& sp = impl->sp;
  FM_CHECK(sp.pad_id() == kPadId && sp.unk_id() == kUnkId && sp.bos_id() == kBosId &&
               sp.eos_id() == kEosId,
           "{}: special ids must be pad={} unk={} bos={} eos={} (got pad={} unk={} bos={} eos={})",
           origin, kPadId, kUnkId, kBosId, kEosId, sp.pad_id(), sp.unk_id(), sp.bos_id(),
           sp.eos_id());
  impl->serialized = std::move(bytes);
  return Tokenizer(std::move(impl), std::move(origin));
}

std::vector<std::string> Tokenizer::embedded_names() {
  std::vector<std::string> names;
  for (const auto& [name, bytes] : embedded_tokenizer_models()) names.push_back(name);
  return names;
}

Tokenizer Tokenizer::embedded(const std::string& name) {
  static std::mutex mutex;
  static std::map<std::string, Tokenizer> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = cache.find(name); it != cache.end()) return it->second;
  const auto& models = embedded_tokenizer_models();
  auto it = models.find(name);
  FM_CHECK(it != models.end(), "unknown embedded tokenizer '{}' (known: {})", name,
           fmt::join(embedded_names(), ", "));
  Tokenizer t = from_serialized(std::string(it->second), fmt::format("<embedded {}.model>", name));
  cache.emplace(name, t);
  return t;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto status = impl_->sp.Encode(text, &ids);
  FM_CHECK(status.ok(), "{}: cannot encode text ({})", origin_, status.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
}

void Tokenizer::check_id(int32_t id) const {
  FM_CHECK(id >= 0 && id < vocab_size(), "{}: token id {} out of range [0, {})", origin_, id,
           vocab_size());
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  for (int32_t id : ids) check_id(id);
  std::string text;
  const auto status = impl_->sp.Decode(std::vector<int>(ids.begin(), ids.end()), &text);
  FM_CHECK(status.ok(), "{}: cannot decode ids ({})", origin_, status.ToString());
  return text;
}

int32_t Tokenizer::vocab_size() const {
  return impl_->sp.GetPieceSize();
}
int32_t Tokenizer::pad_id() const {
  return impl_->sp.pad_id();
}
int32_t Tokenizer::unk_id() const {
  return impl_->sp.unk_id();
}
int32_t Tokenizer::bos_id() const {
  return impl_->sp.bos_id();
}
int32_t Tokenizer::eos_id() const {
  return impl_->sp.eos_id();
}

std::string Tokenizer::id_to_piece(int32_t id) const {
  check_id(id);
  return impl_->sp.IdToPiece(id);
}

int32_t Tokenizer::piece_to_id(std::string_view piece) const {
  return impl_->sp.PieceToId(piece);
}

const std::string& Tokenizer::serialized() const {
  return impl_->serialized;
}

}  // namespace fm
