"""Can the suite fail? Each mutation below is a defect that once left every test green; applied alone to a copy of
the repository, the tests that guard it must fail (fast tier or not: they are named and run whatever their mark).
Run from the repository root:

    python tests/mutations.py            # every mutation: KILLED or SURVIVED, exit 1 if any survived
    python tests/mutations.py 2 5        # some of them, by number

About a minute a mutation on a 2-core machine. docs/layout.md ("Can the tests fail?") lists the results.
"""
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (what the defect is, file, text, replacement, the tests that must fail)
MUTATIONS = [
    ("CIFAR-100 read with its 20 coarse labels", "resnet_cifar/cifar_data.py", '("test",), b"fine_labels"),',
     '("test",), b"coarse_labels"),', ["tests/test_recipe_behaviour.py::test_cifar100_reads_the_fine_labels_of_an_"
                                       "independently_written_file"]),
    ("the schedule ignored: one rate throughout", "resnet_cifar/recipe.py", "        if len(self.rates) == 1:",
     "        if True:", ["tests/test_recipe_behaviour.py::test_the_optimizer_uses_each_rate_from_the_first_step_of_"
                     "its_epoch"]),
    ("every boundary one step late", "resnet_cifar/recipe.py", "boundaries=[epoch * self.steps_per_epoch - 1 for",
     "boundaries=[epoch * self.steps_per_epoch for", ["tests/test_recipe_behaviour.py::test_the_optimizer_uses_each_rate_"
                                                 "from_the_first_step_of_its_epoch"]),
    ("L2 weight decay switched off", "resnet_cifar/units.py",
     "return keras.regularizers.L2(self.weight_decay) if self.weight_decay else None", "return None",
     ["tests/test_recipe_behaviour.py::test_weight_decay_is_in_the_loss_and_the_gradients"]),
    ("the same training order every epoch (the order's function)", "resnet_cifar/training.py",
     "np.random.default_rng([seed, epoch, 2**20])", "np.random.default_rng([seed, 0, 2**20])",
     ["tests/test_recipe_behaviour.py::test_the_training_order_is_fresh_every_epoch_and_a_function_of_seed_and_"
      "epoch"]),
    ("the same training order every epoch (the loop)", "resnet_cifar/training.py", "process_share(epoch_order(config.data_seed, epoch,",
     "process_share(epoch_order(config.data_seed, 0,", ["tests/test_recipe_behaviour.py::test_the_loop_feeds_each_epoch_"
                                                   "its_own_order"]),
    ("unit b built as unit a", "resnet_cifar/units.py", '"b": Unit("conv3 bn relu conv3", after_add="bn relu"),',
     '"b": Unit("conv3 bn relu conv3 bn", after_add="relu"),', ["tests/test_recipe_behaviour.py::test_each_unit_is_"
                                                                 "the_papers_figure"]),
    ("unit c built as unit a", "resnet_cifar/units.py", '"c": Unit("conv3 bn relu conv3 bn relu"),',
     '"c": Unit("conv3 bn relu conv3 bn", after_add="relu"),', ["tests/test_recipe_behaviour.py::test_each_unit_is_"
                                                                 "the_papers_figure"]),
    ("the resume state written in place, not atomically", "resnet_cifar/checkpoints.py", "    atomic_write(path, write)\n",
     "    write(path)\n", ["tests/test_recipe_behaviour.py::test_the_script_killed_while_writing_its_state_resumes"]),
    ("SIGUSR2 not a stop signal (SLURM's warning kills the run)", "resnet_cifar/errors.py",
     "STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)",
     "STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)",
     ["tests/test_run_identity.py::test_a_stop_signal_then_resume_equals_an_uninterrupted_run"]),
    ("a sweep job waits for its script on Popen's lock (the requeue stalls)", "resnet_cifar/sweep_jobs.py",
     "        threading.Thread(target=self.process.wait, daemon=True).start()\n"
     "        code = wait_for(self.process)  # the signal handlers run here\n",
     "        code = self.process.wait()\n",
     ["tests/test_reproduce.py::test_the_time_limit_warning_requeues_within_seconds_and_the_requeued_job_resumes"]),
    ("every multi-process run failing before its first epoch", "resnet_cifar/distributed.py",
     "            start_processes(config)  # JAX: before anything asks for a device\n",
     "            start_processes(config)  # JAX: before anything asks for a device\n"
     "            if cluster.processes > 1:\n                raise TrainingError(\"lost before the first epoch\")\n",
     ["tests/test_multiworker.py::test_two_workers_train_like_one_process"]),
    ("Cutout's centre only where the whole square fits", "resnet_cifar/augmentation.py",
     "centre_y = keras.random.randint((batch, 1), 0, height,", "centre_y = keras.random.randint((batch, 1), 8, height - 8,",
     ["tests/test_recipe_options.py::test_cutout_centres_are_uniform_over_the_image_independent_per_image_and_"
      "clipped"]),
    ("the mixed labels paired otherwise than the images", "resnet_cifar/mixing.py",
     'ops.take(target, drawn["pairing"], 0)', "ops.flip(target, 0)",
     ["tests/test_recipe_options.py::test_the_loss_mixes_and_smooths_the_labels_with_the_pairing_and_weight_of_the_"
      "images"]),
    ("the warm-up one step ahead", "resnet_cifar/recipe.py", "self.peak * step / self.warmup_steps, after)",
     "self.peak * (step + 1) / self.warmup_steps, after)",
     ["tests/test_recipe_options.py::test_the_learning_rate_of_every_step_equals_the_formula"]),
    ("the test set evaluated with the trained weights, not their average", "resnet_cifar/evaluation.py",
     "self.model, self.ema = model, bool(config.ema)", "self.model, self.ema = model, False",
     ["tests/test_recipe_options_runs.py::test_every_option_trains_and_its_saved_model_evaluates_to_the_history"]),
]


def mutate(number):
    """Applies mutation `number` (1-based) to a copy of the repository and runs its tests: True if they fail."""
    what, path, text, replacement, tests = MUTATIONS[number - 1]
    with tempfile.TemporaryDirectory(prefix="mutant-") as copy:
        shutil.copytree(ROOT, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", "logs", "checkpoints", "sweeps", "data", "results", "__pycache__", ".pytest_cache"))
        with open(os.path.join(copy, path)) as f:
            source = f.read()
        if source.count(text) != 1:
            raise SystemExit(f"mutation {number} ({what}): {path} no longer holds its text once; update the list")
        with open(os.path.join(copy, path), "w") as f:
            f.write(source.replace(text, replacement))
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
                               *tests], cwd=copy, capture_output=True, text=True, timeout=1800)
    if done.returncode not in (0, 1):  # 1: tests failed; anything else (none collected, an error) is no verdict
        raise SystemExit(f"mutation {number} ({what}): pytest exited {done.returncode}\n{done.stdout[-2000:]}")
    return done.returncode == 1


def main(argv):
    numbers = [int(n) for n in argv] or range(1, len(MUTATIONS) + 1)
    survived = 0
    for number in numbers:
        killed = mutate(number)
        survived += not killed
        print(f"{number:2d} {'KILLED  ' if killed else 'SURVIVED'} {MUTATIONS[number - 1][0]}", flush=True)
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
