"""Training and fine-tuning face embeddings the FaceNet way (Schroff et al. 2015): triplet loss on
L2-normalised embeddings with online triplet mining inside identity-balanced batches, or the softmax
(+ centre loss) alternative that Sandberg's implementation recommends. Imports torch: only load this package
when training."""
