// The foremoe subcommands: each registers itself on the CLI11 app and runs
// when selected. One file per subcommand.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>

#include "engine/backend.h"
#include "engine/error.h"

namespace fm::cli {

using Runner = std::function<int()>;

// Each returns the function that runs the subcommand once parsing succeeded.
Runner add_info(CLI::App& app);
Runner add_train(CLI::App& app);
Runner add_pretrain(CLI::App& app);
Runner add_corpus(CLI::App& app);
Runner add_sft(CLI::App& app);
Runner add_generate(CLI::App& app);
Runner add_tokenizer(CLI::App& app);
Runner add_tasks(CLI::App& app);
Runner add_trace(CLI::App& app);
Runner add_import_hf(CLI::App& app);
Runner add_logits(CLI::App& app);
Runner add_plot(CLI::App& app);
Runner add_eval(CLI::App& app);
Runner add_ep_check(CLI::App& app);

// --device: where the subcommand's models run (engine/backend.h, make_backend), checked when
// the command line is parsed.
inline CLI::Option* add_device_option(CLI::App* cmd, std::string& device) {
  return cmd
      ->add_option("--device", device,
                   "cpu, cuda (each rank on the GPU of its local index) or cuda:N")
      ->capture_default_str()
      ->check([](const std::string& v) {
        try {
          parse_device(v);
          return std::string();
        } catch (const Error& e) {
          return std::string(e.what());
        }
      });
}

}  // namespace fm::cli
