// File: tests/cli/node_process.h
//
// Real ktx processes for end-to-end tests: NodeProcess starts a binary (fork +
// exec, stdout and stderr to files), waits for a line on its stderr (the
// readiness line of ktx-node), and stops it with a signal; its destructor
// kills what is still running, so a failing test leaves no process behind.
// FreeLoopbackPort finds a port for a topology file; PollUntil waits on a
// condition with a deadline. Header-only.
//
// Thread-safety: one NodeProcess per thread.
#pragma once

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fcntl.h>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace ktx::testing_util {

inline std::string ReadFileText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A port that was free a moment ago on 127.0.0.1 (bound to port 0, then
// released). Another process may take it before it is used; tests use fresh
// ports per run so that a clash fails loudly rather than silently.
inline int FreeLoopbackPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

// True once `done()` holds, false after `timeout`.
inline bool PollUntil(const std::function<bool()>& done, std::chrono::milliseconds timeout,
                      std::chrono::milliseconds step = std::chrono::milliseconds(20)) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (done()) return true;
    std::this_thread::sleep_for(step);
  }
  return done();
}

class NodeProcess {
 public:
  NodeProcess() = default;
  NodeProcess(const NodeProcess&) = delete;
  NodeProcess& operator=(const NodeProcess&) = delete;
  ~NodeProcess() { Kill(SIGKILL); }

  // Starts `argv[0]` with `argv`; `name` labels its output files.
  bool Start(const std::vector<std::string>& argv, const std::string& name) {
    static int counter = 0;
    const std::string stem = ::testing::TempDir() + "/ktx_proc_" + std::to_string(getpid()) + "_" +
                             std::to_string(counter++) + "_" + name;
    out_path_ = stem + ".out";
    err_path_ = stem + ".err";
    name_ = name;
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) return false;
    if (pid == 0) {
      const int out = ::open(out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int err = ::open(err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (out >= 0) ::dup2(out, 1);
      if (err >= 0) ::dup2(err, 2);
      const int null_in = ::open("/dev/null", O_RDONLY);
      if (null_in >= 0) ::dup2(null_in, 0);
      ::execv(args[0], args.data());
      std::perror("execv");
      ::_exit(127);
    }
    pid_ = pid;
    exited_ = false;
    return true;
  }

  // Waits until stderr contains `text`; false on timeout or when the process
  // exits first (its output is then in err()).
  bool WaitForStderr(const std::string& text, std::chrono::milliseconds timeout) {
    return PollUntil(
               [&] {
                 if (err().find(text) != std::string::npos) return true;
                 return !Running();
               },
               timeout) &&
           err().find(text) != std::string::npos;
  }

  bool Running() {
    if (pid_ <= 0 || exited_) return false;
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      exited_ = true;
      status_ = status;
      return false;
    }
    return true;
  }

  void Signal(int sig) {
    if (Running()) ::kill(pid_, sig);
  }

  // Sends `sig` and waits for the exit (SIGKILL after `timeout`). Returns the
  // exit code, 128 + signal when killed by one, -1 when nothing ran.
  int Stop(int sig, std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
    if (pid_ <= 0) return -1;
    Signal(sig);
    if (!PollUntil([&] { return !Running(); }, timeout)) {
      ::kill(pid_, SIGKILL);
      PollUntil([&] { return !Running(); }, std::chrono::seconds(10));
    }
    return ExitCode();
  }

  void Kill(int sig) {
    if (pid_ > 0 && Running()) {
      ::kill(pid_, sig);
      PollUntil([&] { return !Running(); }, std::chrono::seconds(10));
    }
  }

  int ExitCode() const {
    if (!exited_) return -1;
    if (WIFEXITED(status_)) return WEXITSTATUS(status_);
    if (WIFSIGNALED(status_)) return 128 + WTERMSIG(status_);
    return -1;
  }

  pid_t pid() const { return pid_; }
  std::string out() const { return ReadFileText(out_path_); }
  std::string err() const { return ReadFileText(err_path_); }
  const std::string& name() const { return name_; }

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  int status_ = 0;
  std::string name_;
  std::string out_path_;
  std::string err_path_;
};

}  // namespace ktx::testing_util
