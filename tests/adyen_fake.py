"""A loopback stand-in for Adyen's Checkout refund endpoint, answering as its docs show:
`POST /v71/payments/{paymentPspReference}/refunds` → 201 `{"status": "received", ...}`.
It ignores Idempotency-Key (recording it), so a test that sees one refund here proves our
own exactly-once path, not Adyen's dedup. The outcome is a notification the test sends."""

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from domain.models import ChargeSnapshot

RECORDED_REFUND = Path(__file__).parent / "payloads" / "adyen_REFUND.json"


def refund_notification(additional_data: Any) -> bytes:
    """Adyen's recorded REFUND notification with `additionalData` replaced (unsigned): the
    named bad inputs put a list or a string there, where Adyen sends an object."""
    doc = json.loads(RECORDED_REFUND.read_text())
    doc["notificationItems"][0]["NotificationRequestItem"]["additionalData"] = additional_data
    return json.dumps(doc).encode()


@dataclass
class FakeAdyen:
    """Payments the test registered and every refund the endpoint accepted."""

    api_key: str
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: list[dict[str, Any]] = field(default_factory=list)
    unavailable: int = 0
    """The next creates Adyen answers with a 500 before acting (its documented error shape)."""
    next_psp: str | None = None
    """The pspReference the next refund gets (a new one otherwise)."""

    def payment(self, amount: int, currency: str, merchant: str, psp: str | None = None) -> str:
        """A payment Adyen holds (its pspReference, new unless given)."""
        psp = psp or secrets.token_hex(8).upper()
        self.payments[psp] = {"amount": amount, "currency": currency, "merchant": merchant}
        return psp

    async def charge(self, psp: str) -> ChargeSnapshot | None:
        """The deployment's own record of a captured payment (Adyen has no lookup)."""
        paid = self.payments.get(psp)
        if paid is None:
            return None
        return ChargeSnapshot(provider="adyen", charge_id=psp, currency=paid["currency"],
                              merchant_account=paid["merchant"], amount=paid["amount"],
                              amount_captured=paid["amount"], captured=True)

    def refunds_of(self, psp: str) -> list[dict[str, Any]]:
        return [r for r in self.refunds if r["paymentPspReference"] == psp]

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v71/payments/{psp}/refunds")
        async def refund(psp: str, request: Request) -> JSONResponse:
            if request.headers.get("x-api-key") != self.api_key:
                return JSONResponse({"status": 401, "errorCode": "000", "message": "HTTP Status "
                                     "Response - Unauthorized", "errorType": "security"}, 401)
            body = await request.json()
            if self.unavailable > 0:
                self.unavailable -= 1
                return JSONResponse({"status": 500, "errorCode": "000", "message": "An unexpected "
                                     "error occurred", "errorType": "internal"}, 500)
            if psp not in self.payments:
                return JSONResponse({"status": 422, "errorCode": "167", "message": "Original "
                                     "pspReference required for this operation",
                                     "errorType": "validation"}, 422)
            answer = {"merchantAccount": body["merchantAccount"], "paymentPspReference": psp,
                      "pspReference": self.next_psp or secrets.token_hex(8).upper(),
                      "reference": body["reference"], "status": "received", "amount": body["amount"]}
            self.next_psp = None
            self.refunds.append({**answer, "idempotencyKey": request.headers.get("idempotency-key")})
            return JSONResponse(answer, 201)

        return app
