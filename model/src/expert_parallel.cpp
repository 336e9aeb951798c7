#include "model/expert_parallel.h"

#include "engine/error.h"

namespace fm {

void copy_param_shard(Backend& backend, const ParamArena& full, ParamArena& shard, int rank) {
  const int64_t W = shard.expert_shards();
  FM_CHECK(full.expert_shards() == 1, "copy_param_shard: the source arena is itself a shard");
  FM_CHECK(rank >= 0 && rank < W, "copy_param_shard: rank {} is not in [0, {})", rank, W);
  for (const ParamSlot& to : shard.slots()) {
    const ParamSlot& from = full.slot(to.name);
    Tensor src = *from.slot;
    if (to.expert) {
      const int64_t part = to.shape[0];
      FM_CHECK(from.shape[0] == part * W,
               "copy_param_shard: {} has {} experts in the full arena, {} x {} in the shard",
               to.name, from.shape[0], W, part);
      src = src.slice(rank * part, (rank + 1) * part);
    }
    FM_CHECK(src.shape() == to.shape, "copy_param_shard: {} is {} in the full arena, {} here",
             to.name, shape_str(src.shape()), shape_str(to.shape));
    backend.copy(*to.slot, src);
  }
}

}  // namespace fm
