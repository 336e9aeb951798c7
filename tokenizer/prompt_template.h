// How a task prompt becomes the model's input, and its answer the target:
//   prompt ids = bos + encode(render(prompt))
//   answer ids = encode(answer) + eos
// Templates, selected by name:
//   plain: "{prompt}"
//   chat:  "User: {prompt}\nAssistant: "
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace fm {

class Tokenizer;

class PromptTemplate {
 public:
  // Unknown names are an error listing the known ones.
  static PromptTemplate named(const std::string& name);
  static std::vector<std::string> names();

  const std::string& name() const { return name_; }
  std::string render(std::string_view prompt) const;
  std::vector<int32_t> encode_prompt(const Tokenizer& tokenizer, std::string_view prompt) const;
  std::vector<int32_t> encode_answer(const Tokenizer& tokenizer, std::string_view answer) const;

 private:
  PromptTemplate(std::string name, std::string before, std::string after);
  std::string name_;
  std::string before_;  // text before the prompt
  std::string after_;   // text after the prompt
};

}  // namespace fm
