"""A small shop with realistic (and entirely made-up) personal data, built the same way every time."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

FIRST = [
    "Alice",
    "Bruno",
    "Chloé",
    "Dmitri",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemi",
    "Liam",
    "Maya",
    "Noor",
    "Oscar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
]
LAST = [
    "Anders",
    "Bianchi",
    "Costa",
    "Dubois",
    "Eriksen",
    "Fischer",
    "García",
    "Haddad",
    "Ivanova",
    "Jensen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Nakamura",
    "Okafor",
    "Petrov",
    "Quinn",
    "Rossi",
]
DOMAINS = ["example.com", "mail.example.org", "inbox.example.net"]
NOTES = [
    "Prefers delivery after 5pm.",
    "Asked to be contacted at {alt_email} instead.",
    "Called support from {phone} about a late order.",
    "Paid once with card {card} over the phone; follow up.",
    "VIP customer, no special handling.",
    "",
]
STATUSES = ["pending", "paid", "shipped", "delivered", "refunded"]
METHODS = ["card", "paypal", "bank_transfer"]

SCHEMA = """
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    phone TEXT,
    ssn TEXT,
    card_number TEXT,
    notes TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    total NUMERIC NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE payments (
    id INTEGER PRIMARY KEY,
    order_id INTEGER NOT NULL REFERENCES orders(id),
    amount NUMERIC NOT NULL,
    method TEXT NOT NULL,
    paid_at TEXT NOT NULL
);
CREATE TABLE api_keys (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    label TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX orders_customer ON orders(customer_id);
CREATE INDEX payments_order ON payments(order_id);
"""


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    """A card number that passes the Luhn check, as real ones do."""
    digits = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return digits + str((10 - total % 10) % 10)


def shop_rows(seed: int = 7) -> dict[str, list[tuple[object, ...]]]:
    """Typed rows (datetime, Decimal) per table; the same every time for one seed."""
    rng = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    customers, orders, payments, keys = [], [], [], []
    for cid in range(1, 61):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        email = f"{first.lower()}.{last.lower()}{cid}@{rng.choice(DOMAINS)}".replace("é", "e").replace(
            "í", "i"
        )
        phone = f"+1-202-555-{rng.randrange(100, 199):04d}"
        ssn = f"{rng.randrange(100, 665):03d}-{rng.randrange(10, 99):02d}-{rng.randrange(1000, 9999):04d}"
        prefix = rng.choice(["4", "51", "37"])
        card = luhn_complete(prefix, 15 if prefix == "37" else 16, rng)
        note = rng.choice(NOTES).format(
            alt_email=f"{first.lower()}{cid}@personal.example.com",
            phone=f"+1-202-555-{rng.randrange(200, 299):04d}",
            card=luhn_complete("4", 16, rng),
        )
        created = start + timedelta(days=rng.randrange(300), minutes=rng.randrange(1440))
        customers.append((cid, f"{first} {last}", email, phone, ssn, card, note, created))
        keys.append(
            (
                cid,
                cid,
                rng.choice(["ci", "laptop", "backup", "reporting"]),
                "sk_live_" + "".join(rng.choice("0123456789abcdef") for _ in range(32)),
                created,
            )
        )
    for oid in range(1, 241):
        cid = rng.randrange(1, 61)
        total = Decimal(rng.randrange(500, 50000)) / 100
        status = rng.choice(STATUSES)
        created = start + timedelta(days=rng.randrange(330), minutes=rng.randrange(1440))
        orders.append((oid, cid, total, status, created))
        if status != "pending":
            payments.append(
                (
                    len(payments) + 1,
                    oid,
                    total,
                    rng.choice(METHODS),
                    created + timedelta(hours=rng.randrange(1, 48)),
                )
            )
    return {"customers": customers, "orders": orders, "payments": payments, "api_keys": keys}


def _sqlite_value(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def create_demo_database(path: Path) -> None:
    """Write the shop to `path` atomically: a half-built demo database never appears."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    db = sqlite3.connect(partial)
    try:
        db.executescript(SCHEMA)
        for table, rows in shop_rows().items():
            marks = ", ".join("?" * len(rows[0]))
            db.executemany(
                f"INSERT INTO {table} VALUES ({marks})", [tuple(map(_sqlite_value, r)) for r in rows]
            )
        db.commit()
    finally:
        db.close()
    partial.replace(path)
