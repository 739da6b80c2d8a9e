#include "topology/profile_file.h"

#include <cctype>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

namespace ktx::topology {
namespace {

// Collects the text parser's first error.
class FirstError : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    if (text_.empty()) text_ = absl::StrCat(line + 1, ":", column + 1, ": ", message);
  }
  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open the ", what));
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

absl::StatusOr<ktx::v1::ExpertUsageProfile> ParseText(const std::string& bytes,
                                                      const std::string& path) {
  ktx::v1::ExpertUsageProfile profile;
  google::protobuf::TextFormat::Parser parser;
  FirstError errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(bytes, &profile)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ":", errors.text(), " (expected a ktx.v1.ExpertUsageProfile in text format)"));
  }
  return profile;
}

}  // namespace

bool IsTextProtoPath(const std::string& path) {
  for (const char* ext : {".textproto", ".txtpb", ".pbtxt", ".txt"}) {
    if (absl::EndsWith(path, ext)) return true;
  }
  return false;
}

absl::Status ValidateExpertUsageProfile(const ktx::v1::ExpertUsageProfile& p,
                                        const std::string& source) {
  auto bad = [&](const std::string& m) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", m));
  };
  if (p.n_expert() < 1) return bad(absl::StrCat("n_expert = ", p.n_expert(), " must be >= 1"));
  if (p.n_expert_used() < 1 || p.n_expert_used() > p.n_expert()) {
    return bad(absl::StrCat("n_expert_used = ", p.n_expert_used(),
                            " outside [1, n_expert = ", p.n_expert(), "]"));
  }
  int previous = -1;
  for (const ktx::v1::LayerUsage& l : p.layers()) {
    const std::string where = absl::StrCat("layer ", l.layer(), ": ");
    if (l.layer() < 0 || l.layer() >= p.n_layer()) {
      return bad(absl::StrCat(where, "outside [0, n_layer = ", p.n_layer(), ")"));
    }
    if (l.layer() <= previous) return bad(absl::StrCat(where, "layers must ascend, each once"));
    previous = l.layer();
    if (l.count_size() != p.n_expert() || l.weight_size() != p.n_expert()) {
      return bad(absl::StrCat(where, "count has ", l.count_size(), " and weight ", l.weight_size(),
                              " entries, expected n_expert = ", p.n_expert()));
    }
    if (l.rank_mass_size() != p.n_expert_used() || l.rank_used_size() != p.n_expert_used()) {
      return bad(absl::StrCat(where, "rank_mass has ", l.rank_mass_size(), " and rank_used ",
                              l.rank_used_size(),
                              " entries, expected n_expert_used = ", p.n_expert_used()));
    }
    if (l.n_tokens() < 0) return bad(absl::StrCat(where, "n_tokens = ", l.n_tokens()));
    int64_t total = 0;
    for (int e = 0; e < l.count_size(); ++e) {
      if (l.count(e) < 0) return bad(absl::StrCat(where, "count[", e, "] = ", l.count(e)));
      total += l.count(e);
    }
    if (total > l.n_tokens() * p.n_expert_used()) {
      return bad(absl::StrCat(where, total, " selections exceed n_tokens x n_expert_used = ",
                              l.n_tokens() * p.n_expert_used()));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ktx::v1::ExpertUsageProfile> ReadExpertUsageProfile(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadFile(path, "expert-usage profile");
  if (!bytes.ok()) return bytes.status();
  ktx::v1::ExpertUsageProfile profile;
  if (IsTextProtoPath(path)) {
    absl::StatusOr<ktx::v1::ExpertUsageProfile> text = ParseText(*bytes, path);
    if (!text.ok()) return text.status();
    profile = *std::move(text);
  } else if (!profile.ParseFromString(*bytes) || profile.n_expert() == 0) {
    absl::StatusOr<ktx::v1::ExpertUsageProfile> text = ParseText(*bytes, path);
    if (!text.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path,
                       ": not an expert-usage profile (ktx.v1.ExpertUsageProfile, binary or "
                       "text format); as text: ",
                       text.status().message()));
    }
    profile = *std::move(text);
  }
  if (absl::Status s = ValidateExpertUsageProfile(profile, path); !s.ok()) return s;
  return profile;
}

absl::Status WriteExpertUsageProfile(const ktx::v1::ExpertUsageProfile& profile,
                                     const std::string& path) {
  std::string bytes;
  if (IsTextProtoPath(path)) {
    if (!google::protobuf::TextFormat::PrintToString(profile, &bytes)) {
      return absl::InternalError(absl::StrCat(path, ": cannot render the profile as text"));
    }
  } else if (!profile.SerializeToString(&bytes)) {
    return absl::InternalError(absl::StrCat(path, ": cannot serialise the profile"));
  }
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out || !out.flush()) return absl::UnavailableError(absl::StrCat(path, ": cannot write"));
  return absl::OkStatus();
}

ExpertProfile PlacementProfileFromUsage(const ktx::v1::ExpertUsageProfile& profile) {
  ExpertProfile out;
  for (const ktx::v1::LayerUsage& l : profile.layers()) {
    std::vector<double> w(l.count().begin(), l.count().end());
    double total = 0;
    for (double v : w) total += v;
    if (total > 0) out.weights.emplace(l.layer(), std::move(w));
  }
  return out;
}

absl::StatusOr<ExpertProfile> LoadPlacementProfile(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadFile(path, "expert profile");
  if (!bytes.ok()) return bytes.status();
  for (char c : *bytes) {
    if (std::isspace(static_cast<unsigned char>(c))) continue;
    if (c == '{') return ParseExpertProfileJson(*bytes, path);
    break;
  }
  absl::StatusOr<ktx::v1::ExpertUsageProfile> usage = ReadExpertUsageProfile(path);
  if (!usage.ok()) return usage.status();
  return PlacementProfileFromUsage(*usage);
}

}  // namespace ktx::topology
