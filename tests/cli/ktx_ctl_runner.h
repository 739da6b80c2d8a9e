// File: tests/cli/ktx_ctl_runner.h
//
// Runs the ktx-ctl binary of this build (KTX_CTL_PATH, set by the test's
// CMakeLists) through the shell and captures its exit code, stdout and stderr.
// Header-only, for end-to-end tests of the command line.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include "gtest/gtest.h"

namespace ktx::testing_util {

struct CommandOutput {
  int rc = -1;
  std::string out;
  std::string err;
};

inline std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Runs `ktx-ctl args` (args already shell-quoted where needed). Capture files
// get unique names: ctest runs the tests of one binary as parallel processes.
inline CommandOutput RunKtxCtl(const std::string& args) {
  static int counter = 0;
  const std::string stem = ::testing::TempDir() + "/ktx_ctl_" + std::to_string(getpid()) + "_" +
                           std::to_string(counter++);
  const std::string out_path = stem + ".out";
  const std::string err_path = stem + ".err";
  const std::string command =
      std::string(KTX_CTL_PATH) + " " + args + " >" + out_path + " 2>" + err_path;
  const int status = std::system(command.c_str());
  CommandOutput o;
  o.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  o.out = ReadWholeFile(out_path);
  o.err = ReadWholeFile(err_path);
  std::remove(out_path.c_str());
  std::remove(err_path.c_str());
  return o;
}

}  // namespace ktx::testing_util
