// ktx-ctl tokenize: a model's tokenizer on the command line.
//
//   ktx-ctl tokenize --model M.gguf "Hello world"        -> 0,75,409,392,337,393
//   ktx-ctl tokenize --model M.gguf --pieces "Hello"     -> ids, then one line per token:
//                                                           <id> TAB <piece, escaped>
//   ktx-ctl tokenize --model M.gguf --no-special TEXT    special-token text is plain text
//   ktx-ctl tokenize --model M.gguf --no-bos TEXT        no BOS even if the model adds one
//
// Pieces are the token's bytes: printable text as is, \n \r \t \\ escaped,
// other control bytes and bytes that are not valid UTF-8 as \xNN.
#include <iostream>
#include <memory>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "runtime/gguf/gguf.h"
#include "runtime/tokenizer/tokenizer.h"
#include "runtime/tokenizer/tokenizer_gguf.h"
#include "runtime/tokenizer/utf8.h"

namespace ktx::cli {
namespace {

struct TokenizeFlags {
  std::string model;
  std::string text;
  bool no_special = false;
  bool no_bos = false;
  bool pieces = false;
};

std::string EscapePiece(std::string_view bytes) {
  std::string out;
  size_t pos = 0;
  while (pos < bytes.size()) {
    size_t len = 1;
    const tokenizer::Utf8Scan scan = tokenizer::ScanUtf8(bytes.substr(pos), &len);
    const auto b = static_cast<uint8_t>(bytes[pos]);
    if (scan != tokenizer::Utf8Scan::kValid) {
      for (size_t i = 0; i < len; ++i) {
        absl::StrAppendFormat(&out, "\\x%02x", static_cast<uint8_t>(bytes[pos + i]));
      }
    } else if (b == '\n') {
      out += "\\n";
    } else if (b == '\r') {
      out += "\\r";
    } else if (b == '\t') {
      out += "\\t";
    } else if (b == '\\') {
      out += "\\\\";
    } else if (b < 0x20 || b == 0x7F) {
      absl::StrAppendFormat(&out, "\\x%02x", b);
    } else {
      out.append(bytes.substr(pos, len));
    }
    pos += len;
  }
  return out;
}

int RunTokenize(const TokenizeFlags& flags) {
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> file = gguf::GgufFile::Open(flags.model);
  if (!file.ok()) {
    std::cerr << "ktx-ctl tokenize: " << file.status() << "\n";
    return 1;
  }
  absl::StatusOr<tokenizer::Tokenizer> tok = tokenizer::TokenizerFromGguf((*file)->metadata());
  if (!tok.ok()) {
    std::cerr << "ktx-ctl tokenize: " << flags.model << ": " << tok.status() << "\n";
    return 1;
  }
  tokenizer::TokenizeOptions options;
  options.parse_special = !flags.no_special;
  if (flags.no_bos) options.add_bos = false;
  absl::StatusOr<std::vector<int32_t>> ids = tok->Tokenize(flags.text, options);
  if (!ids.ok()) {
    std::cerr << "ktx-ctl tokenize: " << ids.status() << "\n";
    return 1;
  }
  std::cout << absl::StrJoin(*ids, ",") << "\n";
  if (flags.pieces) {
    for (int32_t id : *ids) {
      std::cout << id << "\t" << EscapePiece(tok->Piece(id, /*render_special=*/true)) << "\n";
    }
  }
  return 0;
}

}  // namespace

void AddTokenizeCommands(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<TokenizeFlags>();
  CLI::App* cmd = app.add_subcommand(
      "tokenize", "Tokenize TEXT with a model's tokenizer; prints the ids comma-separated");
  cmd->add_option("--model", flags->model, "GGUF model file (the first part of a split model)")
      ->required();
  cmd->add_flag("--no-special", flags->no_special,
                "Treat special-token text (e.g. <｜begin▁of▁sentence｜>) as plain text");
  cmd->add_flag("--no-bos", flags->no_bos, "Do not add the BOS token");
  cmd->add_flag("--pieces", flags->pieces,
                "Also print one line per token: id, tab, its bytes (escaped)");
  cmd->add_option("text", flags->text, "The text to tokenize")->required();
  cmd->callback([exit_code, flags] { *exit_code = RunTokenize(*flags); });
}

}  // namespace ktx::cli
