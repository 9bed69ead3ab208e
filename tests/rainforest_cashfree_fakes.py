"""Loopback stand-ins for Rainforest's and Cashfree's refund APIs, answering in the shapes
their docs and webhook payloads show. Like localstripe, neither honours idempotency (keys
are recorded, never used), so a test that sees one refund here proves our own exactly-once
path. Cashfree refuses a refund_id it holds (per merchant, as it does), so a test of a
resend counts the creates it was sent (`creates`). Outcomes arrive as webhooks the test
sends."""

import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from adapters.providers.normalise import exact_json

# The credentials tests give the fakes (and our adapters, to call them).
RAINFOREST_KEY = "sbx_apikey_test_0123456789abcdef"
CASHFREE_ID = "TEST1234567890CF"
CASHFREE_API_SECRET = "cfsk_ma_test_secret"


def _stamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class FakeRainforest:
    """Payins the test registered and every refund the API accepted (newest last)."""

    api_key: str
    merchant_id: str = "mid_2sPMdFkHyz2NsLvGB3U9DeaLdMz"
    payins: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: list[dict[str, Any]] = field(default_factory=list)
    chargebacks: list[dict[str, Any]] = field(default_factory=list)
    declined: set[str] = field(default_factory=set)
    """Payins whose refunds Rainforest refuses (e.g. a payin still in review)."""

    def payin(self, amount: int, status: str = "SUCCEEDED") -> str:
        payin_id = f"pyi_{secrets.token_hex(12)}"
        self.payins[payin_id] = {"payin_id": payin_id, "merchant_id": self.merchant_id, "amount": amount,
                                 "currency_code": "USD", "status": status, "method_type": "CARD",
                                 "metadata": {}, "refundable_amount": amount}
        return payin_id

    def refunds_of(self, payin_id: str) -> list[dict[str, Any]]:
        return [r for r in self.refunds if r["payin_id"] == payin_id]

    def chargebacks_of(self, payin_id: str) -> list[dict[str, Any]]:
        return [c for c in self.chargebacks if c["payin_id"] == payin_id]

    def chargeback(self, payin_id: str, amount: int) -> str:
        """A chargeback against the payin, in the fields its chargeback webhooks document."""
        chargeback_id = f"chb_{secrets.token_hex(12)}"
        self.chargebacks.append({"chargeback_id": chargeback_id, "payin_id": payin_id,
                                 "merchant_id": self.merchant_id, "amount": amount,
                                 "currency_code": "USD", "status": "INQUIRY_ACTION_REQUIRED",
                                 "metadata": {}, "method_type": "CARD", "reason_code": "13.1",
                                 "reason_desc": "Merchandise/services not received"})
        self.payins[payin_id]["refundable_amount"] -= amount
        return chargeback_id

    def history(self, payin_id: str, amount: int, created: datetime, status: str = "SUCCEEDED") -> str:
        """A refund made at Rainforest long ago (no webhook)."""
        refund = self._refund(payin_id, amount, f"hist-{secrets.token_hex(4)}", {}, created)
        refund["status"] = status
        return str(refund["refund_id"])

    def _refund(self, payin_id: str, amount: int, key: str, metadata: dict[str, Any],
                created: datetime) -> dict[str, Any]:
        refund = {"refund_id": f"rfd_{secrets.token_hex(12)}", "payin_id": payin_id,
                  "merchant_id": self.merchant_id, "idempotency_key": key, "amount": amount,
                  "currency_code": "USD", "reason": "requested_by_customer", "status": "CREATED",
                  "metadata": metadata, "amount_splits": None, "created_at": _stamp(created),
                  "updated_at": _stamp(created)}
        self.refunds.append(refund)
        self.payins[payin_id]["refundable_amount"] -= amount
        return refund

    def app(self) -> FastAPI:
        app = FastAPI()

        def ok(data: Any) -> JSONResponse:
            return JSONResponse({"status": "SUCCESS", "data": data})

        def error(status: int, code: str, message: str) -> JSONResponse:
            return JSONResponse({"status": "ERROR", "errors": [{"code": code, "message": message}]}, status)

        @app.middleware("http")
        async def authorised(request: Request, call_next: Any) -> Response:
            if request.headers.get("authorization") != f"Bearer {self.api_key}" or \
                    request.headers.get("rainforest-api-version") != "2024-10-16":
                return error(401, "UNAUTHORIZED", "invalid API key or version")
            answer: Response = await call_next(request)
            return answer

        @app.get("/v1/payins/{payin_id}")
        async def get_payin(payin_id: str) -> JSONResponse:
            if payin_id not in self.payins:
                return error(404, "NOT_FOUND", "payin not found")
            return ok({**self.payins[payin_id], "refunds": self.refunds_of(payin_id),
                       "chargebacks": self.chargebacks_of(payin_id)})

        @app.post("/v1/payins/{payin_id}/refund")
        async def refund(payin_id: str, request: Request) -> JSONResponse:
            body = await request.json()
            payin = self.payins.get(payin_id)
            if payin is None or payin_id in self.declined:
                return error(400, "INVALID_REQUEST", "payin cannot be refunded")
            if body["amount"] > payin["refundable_amount"]:
                return error(400, "INVALID_AMOUNT", "amount exceeds the refundable amount")
            return ok(self._refund(payin_id, body["amount"], body["idempotency_key"],
                                   body.get("metadata") or {}, datetime.now(UTC)))

        @app.get("/v1/refunds")
        async def list_refunds(created_at_start: str, created_at_end: str, limit: int = 100,
                               page_token: str | None = None) -> JSONResponse:
            start, end = datetime.fromisoformat(created_at_start), datetime.fromisoformat(created_at_end)
            window = sorted((r for r in self.refunds
                             if start <= datetime.fromisoformat(r["created_at"]) < end),
                            key=lambda r: r["created_at"], reverse=True)
            offset = int(page_token or 0)
            page = window[offset:offset + limit]
            more = offset + limit < len(window)
            return ok({"results": page, "next_page_token": str(offset + limit) if more else None})

        return app


@dataclass
class FakeCashfree:
    """Orders the test registered and every refund the PG API accepted."""

    client_id: str
    client_secret: str
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: list[dict[str, Any]] = field(default_factory=list)
    payment_ids: dict[str, int] = field(default_factory=dict)
    disputes: list[dict[str, Any]] = field(default_factory=list)
    declined: set[str] = field(default_factory=set)
    """Orders whose refunds Cashfree refuses (e.g. past its six-month window)."""
    creates: list[str] = field(default_factory=list)
    """The refund_id of every create sent, refused or not."""
    lookup_misses: int = 0
    """The next lookups of a refund by its refund_id that answer 404 although it was made
    (a read that lags the write)."""
    ids_ignore_case: bool = False
    """Whether lookups and the duplicate check match refund_ids without regard to case (not
    known of Cashfree)."""

    def order(self, amount: Decimal, status: str = "PAID") -> str:
        order_id = f"order_{secrets.token_hex(10)}"
        self.orders[order_id] = {"cf_order_id": str(secrets.randbelow(10**10)), "order_id": order_id,
                                 "entity": "order", "order_currency": "INR", "order_amount": amount,
                                 "order_status": status, "order_note": None, "order_tags": None}
        self.payment_ids[order_id] = secrets.randbelow(10**9)
        return order_id

    def refunds_of(self, order_id: str) -> list[dict[str, Any]]:
        return [r for r in self.refunds if r["order_id"] == order_id]

    def _same_id(self, held: str, asked: str) -> bool:
        return held == asked or (self.ids_ignore_case and held.lower() == asked.lower())

    def _refund(self, order_id: str, amount: Decimal, refund_id: str, note: str | None,
                key: str | None) -> dict[str, Any]:
        refund = {"cf_payment_id": self.payment_ids[order_id],
                  "cf_refund_id": str(secrets.randbelow(10**8)), "refund_id": refund_id,
                  "order_id": order_id, "entity": "refund", "refund_amount": amount,
                  "refund_currency": self.orders[order_id]["order_currency"], "refund_note": note,
                  "refund_status": "PENDING", "refund_arn": None, "refund_charge": Decimal("0"),
                  "status_description": "In Progress", "metadata": None, "refund_splits": [],
                  "refund_type": "MERCHANT_INITIATED", "refund_mode": "STANDARD",
                  "created_at": datetime.now(UTC).isoformat(), "processed_at": None,
                  "x_idempotency_key": key}
        self.refunds.append(refund)
        return refund

    def history(self, order_id: str, amount: Decimal, status: str = "SUCCESS") -> str:
        """A refund made at Cashfree without us (its dashboard), long settled: no webhook."""
        refund = self._refund(order_id, amount, f"dashboard-{secrets.token_hex(4)}", None, None)
        refund.update(refund_status=status, status_description="Refund processed successfully")
        return str(refund["cf_refund_id"])

    def dispute(self, order_id: str) -> str:
        """A chargeback on the order, shaped as Get Disputes by Order ID answers."""
        dispute_id = str(secrets.randbelow(10**9))
        order = self.orders[order_id]
        self.disputes.append({
            "dispute_id": dispute_id, "dispute_type": "CHARGEBACK", "reason_code": "13.1",
            "reason_description": "Merchandise/Services Not Received",
            "dispute_amount": order["order_amount"], "dispute_amount_currency": order["order_currency"],
            "created_at": datetime.now(UTC).isoformat(), "respond_by": None, "updated_at": None,
            "resolved_at": None, "dispute_status": "DISPUTE_CREATED", "cf_dispute_remarks": None,
            "preferred_evidence": [], "dispute_evidence": [],
            "order_details": {"order_id": order_id, "order_currency": order["order_currency"],
                              "order_amount": order["order_amount"],
                              "cf_payment_id": self.payment_ids[order_id]}})
        return dispute_id

    def app(self) -> FastAPI:
        app = FastAPI()

        def answer(body: Any, status: int = 200) -> Response:
            return Response(exact_json(body) if isinstance(body, dict | list) else b"", status,
                            media_type="application/json")

        def error(status: int, code: str, message: str) -> Response:
            return answer({"message": message, "code": code, "type": "invalid_request_error"}, status)

        @app.middleware("http")
        async def authorised(request: Request, call_next: Any) -> Response:
            if (request.headers.get("x-client-id"), request.headers.get("x-client-secret")) != (
                    self.client_id, self.client_secret) or not request.headers.get("x-api-version"):
                return error(401, "authentication_failed", "authentication Failed")
            result: Response = await call_next(request)
            return result

        @app.get("/pg/orders/{order_id}")
        async def get_order(order_id: str) -> Response:
            if order_id not in self.orders:
                return error(404, "order_not_found", "order not found")
            return answer(self.orders[order_id])

        @app.get("/pg/orders/{order_id}/refunds")
        async def refunds(order_id: str) -> Response:
            return answer([{k: v for k, v in r.items() if k != "x_idempotency_key"}
                           for r in self.refunds_of(order_id)])

        @app.get("/pg/orders/{order_id}/disputes")
        async def disputes(order_id: str) -> Response:
            return answer([d for d in self.disputes if d["order_details"]["order_id"] == order_id])

        @app.post("/pg/orders/{order_id}/refunds")
        async def create(order_id: str, request: Request) -> Response:
            body = json.loads(await request.body(), parse_float=Decimal)
            self.creates.append(body["refund_id"])
            order = self.orders.get(order_id)
            if order is None or order_id in self.declined:
                return error(400, "refund_invalid_request", "refund cannot be initiated for this order")
            if not re.fullmatch(r"[A-Za-z0-9_-]{3,40}", str(body["refund_id"])):  # as Cashfree documents
                return error(400, "refund_id_invalid", "refund_id : invalid value provided")
            if any(self._same_id(r["refund_id"], body["refund_id"]) for r in self.refunds):  # per merchant
                return error(400, "refund_id_invalid", "Duplicate Merchant Refund Id")
            refunded = sum((r["refund_amount"] for r in self.refunds_of(order_id)), Decimal(0))
            if body["refund_amount"] > order["order_amount"] - refunded:
                return error(400, "refund_amount_invalid", "refund_amount : invalid value provided")
            refund = self._refund(order_id, body["refund_amount"], body["refund_id"],
                                  body.get("refund_note"), request.headers.get("x-idempotency-key"))
            return answer({k: v for k, v in refund.items() if k != "x_idempotency_key"})

        @app.get("/pg/orders/{order_id}/refunds/{refund_id}")
        async def get_refund(order_id: str, refund_id: str) -> Response:
            if self.lookup_misses > 0:
                self.lookup_misses -= 1
                return error(404, "refund_not_found", "refund does not exist")
            for refund in self.refunds_of(order_id):
                if self._same_id(refund["refund_id"], refund_id):
                    return answer({k: v for k, v in refund.items() if k != "x_idempotency_key"})
            return error(404, "refund_not_found", "refund does not exist")

        return app


def days_ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)
