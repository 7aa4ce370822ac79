"""refinfer as a correctness oracle for other engines' CI.

Where this sits: after the forward pass. A model's outputs go to files, files are
compared, and the comparisons are the statistics people already use:

    model.logits / reference.logits --files.py--> logits .npz  --compare.py--> statistics
    Model.trace / reference taps    --trace.py--> trace .npz   --compare.py--> first bad tensor
    text --perplexity.py--> PPL;  log-probs --kld_file.py--> llama.cpp's KLD base file
    base file + logits --kld_report.py--> llama-perplexity's KL-divergence block

stats.py holds the math all of them share (log-softmax, KLD, NMSE, percentiles);
distributed.py runs the chunks of a corpus on a Ray cluster (perplexity, logits).
"""
