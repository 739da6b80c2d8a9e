// File: actors/service/drainable.h
//
// A service that can drain: after BeginDrain it refuses new calls
// (UNAVAILABLE "draining") while the calls already running go on; WaitIdle
// waits for them to end. NodeServer drains every registered Drainable at
// once (NodeServer::BeginDrain) and waits for all of them (WaitIdle).
//
// Thread-safety: implementations are thread-safe; BeginDrain is idempotent.
#pragma once

#include <chrono>

namespace ktx::service {

class Drainable {
 public:
  virtual ~Drainable() = default;
  virtual void BeginDrain() = 0;
  virtual bool draining() const = 0;
  // Calls being served now.
  virtual int in_flight() const = 0;
  // True once no call is in flight; false when `timeout` passed first.
  virtual bool WaitIdle(std::chrono::milliseconds timeout) = 0;
};

}  // namespace ktx::service
