"""What the tests share: the engine harness, buyers, Stripe and billing fixtures."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
