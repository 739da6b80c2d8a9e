// ktx-ctl: the command-line tool for ktx (topology, model tools, status, generate).
#include <iostream>
#include <string>

#include "CLI/CLI.hpp"
#include "cli/commands.h"
#include "runtime/base/logging.h"

int main(int argc, char** argv) {
  CLI::App app{"ktx-ctl: run, inspect and operate ktx, the MoE inference runtime"};
  app.require_subcommand(1);
  std::string log_level;
  app.add_option("--log-level", log_level,
                 "debug|info|warning|error|off (default: KTX_LOG_LEVEL or info)");
  app.parse_complete_callback([&log_level] {
    ktx::LogLevel level;
    if (!log_level.empty()) {
      if (!ktx::ParseLogLevel(log_level, &level)) {
        throw CLI::ValidationError(
            "--log-level", "expected debug|info|warning|error|off, got '" + log_level + "'");
      }
      ktx::SetLogLevel(level);
    }
  });
  int exit_code = 0;
  ktx::cli::AddTopologyCommands(app, &exit_code);
  ktx::cli::AddClientCommands(app, &exit_code);
  ktx::cli::AddSynthCommands(app, &exit_code);
  ktx::cli::AddTokenizeCommands(app, &exit_code);
  ktx::cli::AddInspectCommands(app, &exit_code);
  ktx::cli::AddRunCommands(app, &exit_code);
  ktx::cli::AddBenchCommands(app, &exit_code);
  ktx::cli::AddProfileCommands(app, &exit_code);
  ktx::cli::AddEvalCommands(app, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
