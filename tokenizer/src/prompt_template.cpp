#include "tokenizer/prompt_template.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "engine/error.h"
#include "tokenizer/tokenizer.h"

namespace fm {

PromptTemplate::PromptTemplate(std::string name, std::string before, std::string after)
    : name_(std::move(name)), before_(std::move(before)), after_(std::move(after)) {}

std::vector<std::string> PromptTemplate::names() {
  return {"plain", "chat"};
}

PromptTemplate PromptTemplate::named(const std::string& name) {
  if (name == "plain") return PromptTemplate("plain", "", "");
  if (name == "chat") return PromptTemplate("chat", "User: ", "\nAssistant: ");
  throw Error(
      fmt::format("unknown prompt template '{}' (known: {})", name, fmt::join(names(), ", ")));
}

std::string PromptTemplate::render(std::string_view prompt) const {
  std::string out;
  out.reserve(before_.size() + prompt.size() + after_.size());
  out.append(before_).append(prompt).append(after_);
  return out;
}

std::vector<int32_t> PromptTemplate::encode_prompt(const Tokenizer& tokenizer,
                                                   std::string_view prompt) const {
  std::vector<int32_t> ids{tokenizer.bos_id()};
  const std::vector<int32_t> body = tokenizer.encode(render(prompt));
  ids.insert(ids.end(), body.begin(), body.end());
  return ids;
}

std::vector<int32_t> PromptTemplate::encode_answer(const Tokenizer& tokenizer,
                                                   std::string_view answer) const {
  std::vector<int32_t> ids = tokenizer.encode(answer);
  ids.push_back(tokenizer.eos_id());
  return ids;
}

}  // namespace fm
