"""Training: one loop for pre-training and SFT (`loop`), its config (`config`), AdamW and the schedule (`optim`),
checkpoints (`checkpoint`), torchrun set-up (`distributed`), and run monitoring (`metrics`)."""
