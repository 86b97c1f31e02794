"""Tests of postvault.conf."""
