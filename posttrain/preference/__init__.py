"""Preference training on TRL: a DPO stage (``posttrain dpo``), on our data shapes, chat template and
run-folder conventions (:mod:`posttrain.preference.dpo`)."""
