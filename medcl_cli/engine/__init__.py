"""Training: the fit loop (`loop`) and what it needs (`setup`, `optim`, `device`, `checkpoint`, `runs`,
`validation`, `distributed`), and the library side of `medcl pretrain` / `medcl finetune` (`training`)."""
