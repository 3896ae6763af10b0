"""PyTorch side of the training-speed comparison (issue 15): the same model, sequence lengths,
batch 1, gradient checkpointing (layer recomputation), AdamW, f32; tokens/s over timed steps
after one warm-up step, and peak RSS. SEQ is one length for every step, or a comma-separated
list, one length per step (abf-tune's steps, so both sides train the same token counts)."""
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM

model_dir, seq_arg, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
lengths = [int(x) for x in seq_arg.split(",")]
if len(lengths) == 1:
    lengths = lengths * (steps + 1)
steps = len(lengths) - 1
threads = int(sys.argv[4]) if len(sys.argv) > 4 else torch.get_num_threads()
torch.set_num_threads(threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
model.gradient_checkpointing_enable()
model.config.use_cache = False
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.1)
times = []
for s in range(steps + 1):  # the first is warm-up, not timed
    ids = torch.randint(0, model.config.vocab_size, (1, lengths[s]))
    t = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
timed = times[1:]
print(json.dumps({
    "torch": torch.__version__, "threads": threads, "lengths": lengths, "steps": steps,
    "seconds_per_step": sum(timed) / len(timed),
    "tokens_per_s": sum(lengths[1:]) / sum(timed),
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
