// foremoe: RL post-training of Mixture-of-Experts models. `foremoe --help`.
#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstdlib>
#include <map>

#include "engine/error.h"
#include "engine/log.h"
#include "tools/foremoe/commands.h"
#include "tools/foremoe/launch.h"

int main(int argc, char** argv) {
  // A rank started by `foremoe launch` may write into a pipe (--prefix-output): keep its
  // lines whole and timely rather than block-buffered.
  if (std::getenv("FOREMOE_LAUNCHED") != nullptr) std::setvbuf(stdout, nullptr, _IOLBF, 0);
  CLI::App app{"foremoe: RL post-training of Mixture-of-Experts language models"};
  app.require_subcommand(1);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")
      ->capture_default_str();
  std::map<CLI::App*, fm::cli::Runner> runners;
  for (auto add : {
           fm::cli::add_info,
           fm::cli::add_train,
           fm::cli::add_pretrain,
           fm::cli::add_corpus,
           fm::cli::add_sft,
           fm::cli::add_generate,
           fm::cli::add_tokenizer,
           fm::cli::add_tasks,
           fm::cli::add_trace,
           fm::cli::add_import_hf,
           fm::cli::add_logits,
           fm::cli::add_plot,
           fm::cli::add_eval,
           fm::cli::add_ep_check,
           fm::cli::add_launch,
           fm::cli::add_launch_selftest,
       }) {
    fm::cli::Runner run = add(app);
    runners[app.get_subcommands({}).back()] = std::move(run);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    fm::init_logging(log_level);
    for (CLI::App* sub : app.get_subcommands()) return runners.at(sub)();
  } catch (const fm::Error& e) {
    spdlog::error("{}", e.what());
    return 1;
  } catch (const std::exception& e) {
    spdlog::error("unexpected error: {}", e.what());
    return 2;
  }
  return 0;
}
