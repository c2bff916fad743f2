"""Pure loss functions, one module per family: `segmentation` (Dice + CE, shared by every fine-tuning
method), `contrastive` (NT-Xent, SupCon, pixel SupCon: gcl, simclr, semicl), `local` (semicl's local
loss), `pdcr` and `arco`. Each is tested against a naive loop (tests/test_losses_*.py)."""
