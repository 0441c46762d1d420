"""Run VLM-R1's own GRPO script in a built image, as a user would: the check that the gate covers the recipe.

    python benchmarks/vlm_r1_recipe.py VLM_R1_CHECKOUT IMAGE [--steps N] [--config zero3|zero3_offload|zero2]
                                       [--lora] [--resume]

VLM_R1_CHECKOUT is a checkout of https://github.com/om-ai-lab/VLM-R1 (this machine has no GitHub: the library's
`fetch` brings a snapshot). Nothing of it is copied into this repository: it is mounted read-only into the
image. The script

1. compares builder/smoke/recipe_configs.py with the checkout's local_scripts/zero3.json, zero3_offload.json and
   zero2.json (a drift upstream shows here first);
2. makes, inside the image, a tiny Qwen2.5-VL checkpoint with a tokenizer, an image processor and a chat
   template (no hub), four images and a jsonl dataset in VLM-R1's format;
3. runs `torchrun --nproc_per_node 2 src/open_r1/grpo_jsonl.py --deepspeed local_scripts/<config>.json` on the
   CPU (gloo), with its sources on PYTHONPATH (not `pip install -e .`, which would pull deepspeed 0.15.4), and
   prints what ran and where. `--lora` adds the LoRA flags of run_scripts/run_grpo_rec_lora.sh (`--use_peft true
   --lora_r 64 --lora_alpha 128 --lora_dropout 0.05 --lora_task_type CAUSAL_LM --freeze_vision_modules true`; use it
   with `--config zero2`, that script's config) and checks that the adapter was saved. `--resume` runs the command
   twice into one output directory, as a restarted job does: first to step `--steps` saving a checkpoint there, then
   with `--max_steps` one more, when grpo_jsonl.py finds the `checkpoint-*` and calls
   `train(resume_from_checkpoint=True)`; the second run must start from the checkpoint's step and save the next.

VLM-R1 at its current head has two bugs of its own with the versions it pins (transformers 4.49.0); they are
worked around outside the image and outside VLM-R1's files, in a sitecustomize put on PYTHONPATH for this run
(`--no-workarounds` shows the failures):
- vlm_modules/glm_module.py imports `Glm4vForConditionalGeneration`, which transformers 4.49 does not have
  (GLM-4.1V came later): an empty stand-in of that module is put in its place, GLM models are not used here;
- under ZeRO-3 its trainer loads the reference model with `AutoModelForCausalLM`, which in transformers 4.49
  has no Qwen2.5-VL entry: the class is registered through the public Auto API (as the smoke's grpo check does).
And one that is this machine's, not VLM-R1's: with no GPU, accelerate sets up gloo but not DeepSpeed's own comm
layer, and DeepSpeed counts one rank ("train_batch_size ... 2 != 1 * 1 * 1"); each rank calls
`deepspeed.init_distributed()` first, as the smoke's CPU pass does. A GPU run needs none of this.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A chat template of Qwen2.5-VL's shape for the tiny tokenizer: image parts become the vision tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MAKE_INPUTS = """
import json, sys, torch
sys.path.insert(0, "/opt/vlmbuild/lib")
from transformers import Qwen2_5_VLForConditionalGeneration
from vlmbuild.smoke.tiny_model import tiny_config, tiny_images, tiny_processor
torch.manual_seed(0)
# VLM-R1 picks its model class from the path: the directory name must say Qwen2.5-VL.
model_dir = "/work/Qwen2.5-VL-tiny"
Qwen2_5_VLForConditionalGeneration(tiny_config()).save_pretrained(model_dir, safe_serialization=True)
processor = tiny_processor()
processor.chat_template = processor.tokenizer.chat_template = json.loads(sys.argv[1])
processor.save_pretrained(model_dir)
import os
os.makedirs("/work/images", exist_ok=True)
with open("/work/data.jsonl", "w") as out:
    for i, image in enumerate(tiny_images(4)):
        image.save(f"/work/images/{i}.png")
        out.write(json.dumps({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>How many squares are in the image?"},
            {"from": "gpt", "value": str(i + 2)}]}) + "\\n")
print("inputs ready")
"""


WORKAROUNDS = """
# VLM-R1's own bugs with its pinned transformers 4.49.0, worked around for this run only
# (benchmarks/vlm_r1_recipe.py); nothing of the image is changed.
import sys
import types

from transformers import AutoModelForCausalLM, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

# vlm_modules/glm_module.py needs a transformers with GLM-4.1V: an empty stand-in (GLM models are not used here)
glm = types.ModuleType("open_r1.vlm_modules.glm_module")
glm.GLMVModule = None
sys.modules[glm.__name__] = glm
# its trainer loads the reference model under ZeRO-3 with AutoModelForCausalLM, which 4.49 lacks for Qwen2.5-VL
AutoModelForCausalLM.register(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, exist_ok=True)
"""

# CPU only (this machine): DeepSpeed's comm layer up before the Trainer, in each rank torchrun starts, then the
# script as its own __main__. (Not in sitecustomize: every Python a rank starts would run it, py-cpuinfo's too.)
CPU_LAUNCHER = """
import os, runpy, sys
import deepspeed
deepspeed.init_distributed()
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python script.py` would have it
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def read_trainer_state(path: Path) -> dict:
    state = path / "trainer_state.json"
    return json.loads(state.read_text()) if state.is_file() else {}


def compare_configs(checkout: Path) -> bool:
    from vlmbuild.smoke.recipe_configs import CONFIGS

    ok = True
    for name, ours in CONFIGS.items():
        path = checkout / "src" / "open-r1-multimodal" / "local_scripts" / f"{name}.json"
        theirs = json.loads(path.read_text())
        same = json.loads(json.dumps(ours)) == theirs
        ok &= same
        print(f"recipe config {name}: {'the same as' if same else 'DIFFERS from'} {path.relative_to(checkout)}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkout", type=Path)
    parser.add_argument("image")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--config", choices=["zero3", "zero3_offload", "zero2"], default="zero3")
    parser.add_argument("--lora", action="store_true", help="the LoRA flags of run_scripts/run_grpo_rec_lora.sh")
    parser.add_argument("--resume", action="store_true",
                        help="a second run into the same output directory resumes from the first one's checkpoint")
    parser.add_argument("--no-workarounds", action="store_true", help="run VLM-R1 as it is (and see its bugs)")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    configs_ok = compare_configs(checkout)
    work = Path(tempfile.mkdtemp(prefix="vlmbuild-vlm-r1-"))
    try:
        script = "/vlmr1/src/open-r1-multimodal"
        work.chmod(0o777)
        base = ["docker", "run", "--rm", "--network", "none", "--shm-size", "2g", "-v", f"{work}:/work",
                "-v", f"{checkout}:/vlmr1:ro", "--label", "io.vlmbuild.owner=bench"]
        subprocess.run(base + [args.image, "python", "-c", MAKE_INPUTS, json.dumps(CHAT_TEMPLATE)], check=True)
        pythonpath = f"{script}/src"
        (work / "launch_cpu.py").write_text(CPU_LAUNCHER)
        if not args.no_workarounds:
            (work / "workarounds").mkdir()
            (work / "workarounds" / "sitecustomize.py").write_text(WORKAROUNDS)
            pythonpath = f"/work/workarounds:{pythonpath}"
        # A CUDA image's DeepSpeed serves its prebuilt ops to the CUDA accelerator only: on the CPU, as a CPU user of
        # the image would, put its CPU-accelerator build first (a path the image lacks is ignored).
        pythonpath = f"/opt/deepspeed-cpu:{pythonpath}"
        def command(max_steps: int, save: bool) -> list[str]:
            return [
                "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "29511",
                "/work/launch_cpu.py", "src/open_r1/grpo_jsonl.py", "--deepspeed", f"local_scripts/{args.config}.json",
                "--output_dir", "/work/output", "--model_name_or_path", "/work/Qwen2.5-VL-tiny", "--dataset_name",
                "none", "--image_folders", "/work/images", "--data_file_paths", "/work/data.jsonl",
                "--num_generations", "2", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
                "--max_steps", str(max_steps), "--max_completion_length", "8", "--logging_steps", "1",
                "--gradient_checkpointing", "true", "--attn_implementation", "sdpa", "--report_to", "none",
                *(["--save_strategy", "steps", "--save_steps", str(args.steps)] if save else ["--save_strategy", "no"]),
                # run_scripts/run_grpo_rec_lora.sh's LoRA flags
                *(["--use_peft", "true", "--lora_r", "64", "--lora_alpha", "128", "--lora_dropout", "0.05",
                   "--lora_task_type", "CAUSAL_LM", "--freeze_vision_modules", "true"] if args.lora else []),
                # no GPU here: the CPU's process group (gloo), as the gate's own CPU pass runs it
                "--use_cpu", "true", "--ddp_backend", "gloo",
            ]

        env = ["-e", "DS_ACCELERATOR=cpu", "-e", "LOCAL_SIZE=2", "-e", "OMP_NUM_THREADS=1", "-e", "HF_HUB_OFFLINE=1",
               "-e", f"PYTHONPATH={pythonpath}", "-e", "DEBUG_MODE=false", "-e", "WANDB_MODE=offline",
               "-w", script]
        runs = [(args.steps, args.resume)] + ([(args.steps + 1, True)] if args.resume else [])
        what = f"local_scripts/{args.config}.json" + (" with run_grpo_rec_lora.sh's LoRA flags" if args.lora else "")
        failed = 0
        for part, (max_steps, save) in enumerate(runs, 1):
            started = time.monotonic()
            proc = subprocess.run(base + env + [args.image] + command(max_steps, save), capture_output=True, text=True)
            seconds = time.monotonic() - started
            out = proc.stdout + proc.stderr
            print("\n".join(line for line in out.splitlines()[-150:] if not line.startswith("[20")))
            output = work / "output"
            saved = sorted(p.name for p in output.glob("*")) if output.is_dir() else []
            problems = []
            if args.lora and proc.returncode == 0 and not (output / "adapter_model.safetensors").is_file():
                problems.append("no adapter_model.safetensors saved")
            if args.resume and part == 1:
                first_checkpoint = output / f"checkpoint-{args.steps}" / "trainer_state.json"
                written = first_checkpoint.stat().st_mtime_ns if first_checkpoint.is_file() else None
            if args.resume and part == 2:
                # Resumed, not started again: it took one step (one logged loss: --logging_steps 1), left the first
                # run's checkpoint as it was (a run from step 0 saves it again) and saved the next one at the end.
                steps_taken = sum(1 for line in out.splitlines() if line.startswith("{'loss'"))
                final = read_trainer_state(output / f"checkpoint-{max_steps}").get("global_step")
                untouched = written is not None and first_checkpoint.stat().st_mtime_ns == written
                if (steps_taken, final, untouched) != (1, max_steps, True):
                    problems.append(f"not a resume: {steps_taken} step(s) logged, checkpoint-{max_steps} at global "
                                    f"step {final}, checkpoint-{args.steps} "
                                    f"{'untouched' if untouched else 'written again or missing'}")
            label = f"part {part} of 2 ({'resumed' if part == 2 else 'saving a checkpoint'}) " if args.resume else ""
            print(f"VLM-R1 grpo_jsonl.py {label}with {what} in {args.image}: exit {proc.returncode} in {seconds:.0f}s "
                  f"on 2 CPU ranks (gloo), max_steps {max_steps}; saved: {', '.join(saved) or 'nothing'}; recipe "
                  f"configs {'match' if configs_ok else 'DIFFER'}" + (f"; PROBLEMS: {'; '.join(problems)}" if problems
                                                                      else ""))
            failed = failed or proc.returncode or (1 if problems else 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the inputs it made and VLM-R1's output: scratch
    sys.exit(failed or (0 if configs_ok else 1))


if __name__ == "__main__":
    main()
