// File: cli/commands.h
//
// ktx-ctl's subcommands. Each Add*Commands registers its subcommands on the
// app; when one of them runs it stores the process exit code in *exit_code.
// Commands print results to stdout and errors (absl::Status text) to stderr.
#pragma once

namespace CLI {
class App;
}

namespace ktx::cli {

void AddTopologyCommands(CLI::App& app, int* exit_code);
void AddSynthCommands(CLI::App& app, int* exit_code);
void AddTokenizeCommands(CLI::App& app, int* exit_code);
void AddInspectCommands(CLI::App& app, int* exit_code);
void AddRunCommands(CLI::App& app, int* exit_code);
void AddBenchCommands(CLI::App& app, int* exit_code);
void AddClientCommands(CLI::App& app, int* exit_code);  // generate, chat, status --target
void AddProfileCommands(CLI::App& app, int* exit_code);
void AddEvalCommands(CLI::App& app, int* exit_code);

}  // namespace ktx::cli
