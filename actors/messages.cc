#include "actors/messages.h"

#include "actors/scheduler_actor.h"
#include "caf/actor_system_config.hpp"

namespace ktx::actors {

void AddActorMessageTypes(caf::actor_system_config& cfg) {
  cfg.add_message_types<caf::id_block::ktx_actors>();
  // Typed handles that travel inside messages.
  cfg.add_message_type<token_sink_actor>("ktx::actors::token_sink_actor");
}

void ConfigureActorSystem(caf::actor_system_config& cfg, int scheduler_threads) {
  AddActorMessageTypes(cfg);
  cfg.set("scheduler.max-threads", scheduler_threads);
  cfg.set("work-stealing.moderate-poll-attempts", 0);
}

}  // namespace ktx::actors
