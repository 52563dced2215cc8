"""Particle tools shared by the SMC samplers (log-weight normalisation, ESS, systematic resampling).

Being built (issue 15).
"""
