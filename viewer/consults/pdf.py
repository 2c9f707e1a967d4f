"""The consult's record as PDF minutes (biên bản hội chẩn), in Vietnamese with English alongside.

Layout follows the minutes Vietnamese hospitals file: facilities and participants, the case, each
question with the conclusion's answer, the signatures (name, practising-certificate number and scope,
time); then the thread with each pinned image rendered at its author's window with their annotations,
every conclusion version, the requesting side's decision and outcome, and the review evidence (who
had which image on screen, when, how long, at which window, lossy or full quality).

Fonts: DejaVu Sans (Debian ``fonts-dejavu-core``) is embedded for the Vietnamese glyphs; nothing is
fetched from the network. Times are shown in Vietnam time (UTC+7, no daylight saving).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO
from xml.sax.saxutils import escape

from PIL import Image, ImageDraw, ImageFont, ImageOps
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import (Flowable, Image as PdfImage, KeepTogether, PageBreak, Paragraph, SimpleDocTemplate,
                                Spacer, Table, TableStyle)

from archive.models import ConsultConclusion, ConsultMessage
from viewer.consults.record import ConsultRecord
from viewer.render import Window, decode_frame, render_display
from storage import StorageError
from viewer.render.output import ImageFormat

log = logging.getLogger(__name__)

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
VN_TIME = dt.timezone(dt.timedelta(hours=7), "ICT")
PIN_IMAGE_MAX = 900  # pixels: the longer side of a pinned image in the PDF (about 300 dpi at 75 mm)
MAX_REVIEW_ROWS = 2000

PinRenderer = Callable[[ConsultMessage], Image.Image | None]

STATE_LABELS = {
    "requested": "Đã gửi yêu cầu / Requested", "accepted": "Đã tiếp nhận / Accepted",
    "in_discussion": "Đang thảo luận / In discussion", "concluded": "Đã kết luận / Concluded",
    "closed": "Đã đóng / Closed", "declined": "Từ chối / Declined", "withdrawn": "Đã rút / Withdrawn",
    "amended": "Kết luận được bổ sung, sửa đổi / Conclusion amended",
    "decision": "Tuyến dưới ghi nhận quyết định / Decision recorded",
    "outcome": "Tuyến dưới ghi nhận kết quả điều trị / Outcome recorded",
}
URGENCY_LABELS = {"routine": "Thường quy / Routine", "urgent": "Khẩn / Urgent", "emergency": "Cấp cứu / Emergency"}
ROLE_LABELS = {"requester": "Bác sĩ đề nghị / Requesting doctor", "specialist": "Chuyên gia / Specialist",
               "coordinator": "Điều phối / Coordinator", "observer": "Người dự / Observer"}
TIER_LABELS = {"central": "Trung ương / Central", "provincial": "Tỉnh / Provincial",
               "district": "Huyện / District", "commune": "Xã / Commune"}


class FontsMissing(RuntimeError):
    pass


def _register_fonts() -> None:
    if "DejaVuSans" in pdfmetrics.getRegisteredFontNames():
        return
    regular, bold = FONT_DIR / "DejaVuSans.ttf", FONT_DIR / "DejaVuSans-Bold.ttf"
    if not (regular.is_file() and bold.is_file()):
        raise FontsMissing(f"DejaVu fonts not found in {FONT_DIR}: apt-get install fonts-dejavu-core")
    pdfmetrics.registerFont(TTFont("DejaVuSans", str(regular)))
    pdfmetrics.registerFont(TTFont("DejaVuSans-Bold", str(bold)))
    pdfmetrics.registerFontFamily("DejaVuSans", normal="DejaVuSans", bold="DejaVuSans-Bold",
                                  italic="DejaVuSans", boldItalic="DejaVuSans-Bold")


def _styles() -> dict[str, ParagraphStyle]:
    base = ParagraphStyle("base", fontName="DejaVuSans", fontSize=9.5, leading=12.5)
    return {
        "body": base,
        "small": ParagraphStyle("small", parent=base, fontSize=7.5, leading=9.5, textColor=colors.HexColor("#444444")),
        "title": ParagraphStyle("title", parent=base, fontName="DejaVuSans-Bold", fontSize=15, leading=19,
                                alignment=TA_CENTER, spaceAfter=2),
        "subtitle": ParagraphStyle("subtitle", parent=base, alignment=TA_CENTER, textColor=colors.HexColor("#333333")),
        "h2": ParagraphStyle("h2", parent=base, fontName="DejaVuSans-Bold", fontSize=11.5, leading=15,
                             spaceBefore=9, spaceAfter=4, textColor=colors.HexColor("#0b3d5c")),
        "h3": ParagraphStyle("h3", parent=base, fontName="DejaVuSans-Bold", fontSize=10, leading=13, spaceBefore=5),
        "event": ParagraphStyle("event", parent=base, fontSize=8.5, textColor=colors.HexColor("#555555")),
    }


def _t(text: str) -> str:
    """User text made safe for a Paragraph, line breaks kept."""
    return escape(text or "").replace("\n", "<br/>")


def _when(at: dt.datetime | None) -> str:
    if at is None:
        return ""
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    return at.astimezone(VN_TIME).strftime("%d/%m/%Y %H:%M:%S") + " (UTC+7)"


_HEADER = ParagraphStyle("header", fontName="DejaVuSans-Bold", fontSize=8.5, leading=10.5)


def _grid(rows: list[list[Any]], widths: list[float], header: bool = True) -> Table:
    if header:  # header cells wrap like the rest
        rows = [[Paragraph(escape(c), _HEADER) if isinstance(c, str) else c for c in rows[0]]] + rows[1:]
    table = Table(rows, colWidths=widths, repeatRows=1 if header else 0)
    style = [("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#999999")),
             ("FONTNAME", (0, 0), (-1, -1), "DejaVuSans"), ("FONTSIZE", (0, 0), (-1, -1), 8.5),
             ("VALIGN", (0, 0), (-1, -1), "TOP"),
             ("LEFTPADDING", (0, 0), (-1, -1), 3), ("RIGHTPADDING", (0, 0), (-1, -1), 3)]
    if header:
        style += [("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e3edf3")),
                  ("FONTNAME", (0, 0), (-1, 0), "DejaVuSans-Bold")]
    table.setStyle(TableStyle(style))
    return table


# -- pinned images ---------------------------------------------------------------------------


def draw_annotations(image: Image.Image, annotations: list[dict[str, Any]],
                     pixel_spacing: tuple[float, float] | None = None) -> Image.Image:
    """Draw the viewer contract's annotations (image pixel coordinates) on an RGB copy of ``image``."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    scale = max(out.size) / 512
    width = max(1, round(2 * scale))
    font = _pil_font(max(10, round(14 * scale)))
    colour = (255, 214, 0)
    for ann in annotations:
        pts = [(float(x), float(y)) for x, y in ann.get("points", [])]
        kind = ann.get("type")
        if kind in ("length", "arrow") and len(pts) == 2:
            draw.line(pts, fill=colour, width=width)
            if kind == "arrow":
                _arrow_head(draw, pts[0], pts[1], colour, width, 10 * scale)
            else:
                draw.text((pts[1][0] + 4 * scale, pts[1][1]), _length_label(pts, pixel_spacing), fill=colour,
                          font=font, stroke_width=max(1, width // 2), stroke_fill=(0, 0, 0))
        elif kind == "ellipse" and len(pts) == 2:
            (x0, y0), (x1, y1) = pts
            draw.ellipse([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=colour, width=width)
        elif kind == "angle" and len(pts) == 3:
            draw.line(pts, fill=colour, width=width)
            draw.text((pts[1][0] + 4 * scale, pts[1][1]), f"{_angle(pts):.1f}°", fill=colour, font=font,
                      stroke_width=max(1, width // 2), stroke_fill=(0, 0, 0))
        elif kind == "text" and len(pts) == 1:
            draw.text(pts[0], str(ann.get("text", "")), fill=colour, font=font,
                      stroke_width=max(1, width // 2), stroke_fill=(0, 0, 0))
    return out


def _pil_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = FONT_DIR / "DejaVuSans.ttf"
    return ImageFont.truetype(str(path), size) if path.is_file() else ImageFont.load_default()


def _length_label(pts: list[tuple[float, float]], spacing: tuple[float, float] | None) -> str:
    (x0, y0), (x1, y1) = pts
    if spacing:
        row_mm, col_mm = spacing  # PixelSpacing: row spacing (between rows), column spacing
        return f"{math.hypot((x1 - x0) * col_mm, (y1 - y0) * row_mm):.1f} mm"
    return f"{math.hypot(x1 - x0, y1 - y0):.1f} px"


def _angle(pts: list[tuple[float, float]]) -> float:
    (ax, ay), (bx, by), (cx, cy) = pts
    a1, a2 = math.atan2(ay - by, ax - bx), math.atan2(cy - by, cx - bx)
    deg = abs(math.degrees(a1 - a2)) % 360
    return 360 - deg if deg > 180 else deg


def _arrow_head(draw: ImageDraw.ImageDraw, tail: tuple[float, float], tip: tuple[float, float],
                colour: tuple[int, int, int], width: int, size: float) -> None:
    angle = math.atan2(tip[1] - tail[1], tip[0] - tail[0])
    for side in (-0.45, 0.45):
        end = (tip[0] - size * math.cos(angle + side), tip[1] - size * math.sin(angle + side))
        draw.line([tip, end], fill=colour, width=width)


def render_pinned_image(dataset_source: bytes, msg: ConsultMessage) -> Image.Image:
    """The pinned frame at the pinned window, its annotations drawn, then the pinned invert/rotate/flip."""
    viewport = msg.pin_viewport or {}
    frame_index = max(1, msg.pin_frame or 1) - 1
    ds, frame = decode_frame(dataset_source, frame_index)
    window = None
    if viewport.get("wc") is not None and viewport.get("ww") not in (None, 0):
        window = Window(float(viewport["wc"]), float(viewport["ww"]))
    png = render_display(ds, frame, window, None, ImageFormat.PNG)
    image: Image.Image = Image.open(io.BytesIO(png))
    spacing = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    image = draw_annotations(image, list(msg.pin_annotations or []),
                             (float(spacing[0]), float(spacing[1])) if spacing else None)
    if viewport.get("invert") in (True, 1, "1", "true"):
        image = ImageOps.invert(image)
    if viewport.get("flip") == "h":
        image = ImageOps.mirror(image)
    elif viewport.get("flip") == "v":
        image = ImageOps.flip(image)
    rotate = int(viewport.get("rotate") or 0)
    if rotate in (90, 180, 270):
        image = image.rotate(-rotate, expand=True)
    image.thumbnail((PIN_IMAGE_MAX, PIN_IMAGE_MAX))
    return image


def archive_pin_renderer(open_instance: Callable[[str], BinaryIO]) -> PinRenderer:
    """Render pins from the archive (``Archive.open_instance``); a pin that cannot be rendered is logged and shown as text."""
    def render(msg: ConsultMessage) -> Image.Image | None:
        if not msg.pin_instance_uid:
            return None
        try:
            with open_instance(msg.pin_instance_uid) as f:
                return render_pinned_image(f.read(), msg)
        except (OSError, ValueError, KeyError, StorageError) as exc:
            log.warning("consult %s message %s: pinned instance %s not rendered: %s", msg.consult_fk, msg.id,
                        msg.pin_instance_uid, exc)
            return None
    return render


def _pdf_image(image: Image.Image, max_w: float, max_h: float) -> Flowable:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=88)
    buf.seek(0)
    w, h = image.size
    ratio = min(max_w / w, max_h / h)
    return PdfImage(buf, width=w * ratio, height=h * ratio)


# -- the document ----------------------------------------------------------------------------


def build_pdf(record: ConsultRecord, render_pin: PinRenderer | None = None, *,
              generated_by: str = "", generated_at: dt.datetime | None = None) -> bytes:
    """The minutes as PDF bytes."""
    _register_fonts()
    st = _styles()
    c = record.consult
    story: list[Flowable] = []
    story += _header(record, st)
    story += _case(record, st)
    story += _questions_and_conclusion(record, st)
    story += _signatures(record, st)
    story += _follow_ups(record, st)
    story.append(PageBreak())
    story += _thread(record, st, render_pin)
    story += _versions(record, st)
    story += _reviews(record, st)
    generated_at = generated_at or dt.datetime.now(dt.timezone.utc)
    footer = (f"telepacs · Hội chẩn / Consult #{c.id} · In lúc / Printed {_when(generated_at)}"
              + (f" · {generated_by}" if generated_by else ""))

    def on_page(canvas: Any, doc: Any) -> None:
        canvas.saveState()
        canvas.setFont("DejaVuSans", 7)
        canvas.setFillColor(colors.HexColor("#666666"))
        canvas.drawString(15 * mm, 9 * mm, footer)
        canvas.drawRightString(A4[0] - 15 * mm, 9 * mm, f"{doc.page}")
        canvas.restoreState()

    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm, topMargin=14 * mm,
                            bottomMargin=16 * mm, title=f"Biên bản hội chẩn từ xa #{c.id}",
                            author=generated_by or "telepacs", subject="Teleconsultation minutes")
    doc.build(story, onFirstPage=on_page, onLaterPages=on_page)
    return buf.getvalue()


def _header(record: ConsultRecord, st: dict[str, ParagraphStyle]) -> list[Flowable]:
    c = record.consult
    return [
        Paragraph("CỘNG HÒA XÃ HỘI CHỦ NGHĨA VIỆT NAM", st["subtitle"]),
        Paragraph("Độc lập - Tự do - Hạnh phúc", st["subtitle"]),
        Spacer(1, 5 * mm),
        Paragraph("BIÊN BẢN HỘI CHẨN TỪ XA", st["title"]),
        Paragraph("Teleconsultation minutes", st["subtitle"]),
        Paragraph(f"Số / No. {c.id} · {escape(URGENCY_LABELS.get(c.urgency, c.urgency))} · "
                  f"{escape(STATE_LABELS.get(c.state, c.state))}", st["subtitle"]),
        Spacer(1, 4 * mm),
        Paragraph("1. Cơ sở tham gia / Facilities", st["h2"]),
        _grid([
            ["", "Tên / Name", "Tuyến / Tier"],
            [Paragraph("Cơ sở đề nghị hội chẩn / Requesting", st["body"]),
             Paragraph(_t(record.requesting_facility.name), st["body"]),
             Paragraph(TIER_LABELS.get(record.requesting_facility.tier, record.requesting_facility.tier), st["body"])],
            [Paragraph("Cơ sở tư vấn / Consulting hub", st["body"]), Paragraph(_t(record.hub_facility.name), st["body"]),
             Paragraph(TIER_LABELS.get(record.hub_facility.tier, record.hub_facility.tier), st["body"])],
        ], [55 * mm, 85 * mm, 40 * mm]),
        Paragraph("2. Thành phần tham gia / Participants", st["h2"]),
        _grid([["Họ tên / Name", "Vai trò / Role", "Cơ sở / Facility", "Chứng chỉ hành nghề / Certificate"]] + [
            [Paragraph(_t(p.name), st["body"]), Paragraph(ROLE_LABELS.get(p.role, p.role), st["body"]),
             Paragraph(_t(p.facility), st["body"]),
             Paragraph(_t(f"{p.certificate_number} — {p.certificate_scope}" if p.certificate_number else ""),
                       st["body"])]
            for p in record.participants], [45 * mm, 35 * mm, 50 * mm, 50 * mm]),
    ]


def _case(record: ConsultRecord, st: dict[str, ParagraphStyle]) -> list[Flowable]:
    c = record.consult
    informed = "Có / Yes" if c.patient_informed else "Không / No"
    rows = [
        ["Người bệnh / Patient", _t(record.patient_name)],
        ["Mã người bệnh / Patient ID", _t(record.patient_id)],
        ["Chuyên khoa đề nghị / Specialty", _t(c.specialty)],
        ["Thời điểm đề nghị / Requested at", _when(c.created_at)],
        ["Hạn trả lời / Due", _when(c.due_at)],
        ["Người bệnh được thông báo về hội chẩn từ xa / Patient informed of remote consultation", informed],
        ["Nghiên cứu hình ảnh / Studies", "<br/>".join(escape(u) for u in record.study_uids)],
    ]
    out: list[Flowable] = [Paragraph("3. Tóm tắt bệnh án / The case", st["h2"])]
    if record.deidentified:
        out.append(Paragraph("Bản đã ẩn danh theo PS3.15 (hồ sơ cho người dự) / De-identified copy (observer).",
                             st["small"]))
    out.append(_grid([[Paragraph(a, st["body"]), Paragraph(b, st["body"])] for a, b in rows],
                     [65 * mm, 115 * mm], header=False))
    out += [Spacer(1, 2 * mm), Paragraph("Tóm tắt lâm sàng / Clinical summary", st["h3"]),
            Paragraph(_t(c.clinical_summary), st["body"])]
    if c.state == "declined":
        out += [Paragraph("Lý do từ chối / Reason declined", st["h3"]), Paragraph(_t(c.decline_reason), st["body"])]
    return out


def _answers(conclusion: ConsultConclusion | None) -> dict[int, str]:
    return {int(a["position"]): str(a["answer"]) for a in (conclusion.answers if conclusion else [])}


def _questions_and_conclusion(record: ConsultRecord, st: dict[str, ParagraphStyle]) -> list[Flowable]:
    latest = record.latest
    answers = _answers(latest)
    out: list[Flowable] = [Paragraph("4. Câu hỏi hội chẩn và trả lời / Questions and answers", st["h2"])]
    rows: list[list[Any]] = [["#", "Câu hỏi / Question", "Trả lời của chuyên gia / Answer"]]
    for pos, text in record.questions:
        rows.append([str(pos), Paragraph(_t(text), st["body"]),
                     Paragraph(_t(answers.get(pos, "")) or "<i>(chưa trả lời / not answered)</i>", st["body"])])
    out.append(_grid(rows, [8 * mm, 72 * mm, 100 * mm]))
    out.append(Paragraph("5. Kết luận hội chẩn / Conclusion"
                         + (f" (phiên bản / version {latest.version})" if latest else ""), st["h2"]))
    if latest is None:
        out.append(Paragraph("Chưa có kết luận / No conclusion yet.", st["body"]))
        return out
    out += _conclusion_body(latest, st)
    return out


def _conclusion_body(c: ConsultConclusion, st: dict[str, ParagraphStyle]) -> list[Flowable]:
    transfer = ("Có — " + _t(c.transfer_to)) if c.transfer_recommended else "Không / No"
    rows = [["Mô tả hình ảnh / Findings", _t(c.findings)], ["Kết luận / Impression", _t(c.impression)],
            ["Đề xuất / Recommendation", _t(c.recommendation)],
            ["Đề nghị chuyển tuyến / Transfer recommended", transfer]]
    if c.amends_fk:
        rows.insert(0, ["Lý do sửa đổi / Reason for amendment", _t(c.amendment_reason)])
    return [_grid([[Paragraph(a, st["body"]), Paragraph(b, st["body"])] for a, b in rows],
                  [50 * mm, 130 * mm], header=False)]


def _signatures(record: ConsultRecord, st: dict[str, ParagraphStyle]) -> list[Flowable]:
    out: list[Flowable] = [Paragraph("6. Chữ ký / Signatures", st["h2"]),
                           Paragraph("Chuyên gia tư vấn trong phạm vi chuyên môn ghi trong chứng chỉ hành nghề và chịu "
                                     "trách nhiệm về ý kiến tư vấn; cơ sở đề nghị quyết định và chịu trách nhiệm về "
                                     "quyết định của mình. / The consultant advises within the scope of their "
                                     "practising certificate and answers for that advice; the requesting side decides "
                                     "and answers for its decision.", st["small"])]
    rows: list[list[Any]] = [["Phiên bản / Version", "Người ký / Signed by", "Số CCHN / Certificate",
                              "Phạm vi / Scope", "Thời điểm / Signed at"]]
    for c in record.conclusions:
        rows.append([str(c.version), Paragraph(_t(f"{c.signer_name}\n{c.signer_facility}"), st["body"]),
                     Paragraph(_t(c.signer_certificate_number), st["body"]),
                     Paragraph(_t(c.signer_certificate_scope), st["body"]), Paragraph(_when(c.signed_at), st["body"])])
    if len(rows) == 1:
        rows.append(["", Paragraph("Chưa ký / Not signed", st["body"]), "", "", ""])
    out.append(_grid(rows, [20 * mm, 48 * mm, 37 * mm, 35 * mm, 40 * mm]))
    for c in record.conclusions:
        out.append(Paragraph(f"v{c.version} SHA-256: {c.content_hash}", st["small"]))
    return out


def _follow_ups(record: ConsultRecord, st: dict[str, ParagraphStyle]) -> list[Flowable]:
    out: list[Flowable] = [Paragraph("7. Quyết định và kết quả của tuyến dưới / Decision and outcome", st["h2"])]
    if not record.follow_ups:
        return out + [Paragraph("Chưa ghi nhận / Not recorded yet.", st["body"])]
    rows: list[list[Any]] = [["", "Nội dung / Text", "Người ghi / By", "Thời điểm / At"]]
    for item, who in record.follow_ups:
        label = "Quyết định / Decision" if item.kind == "decision" else "Kết quả / Outcome"
        if item.follows_advice is not None:
            label += "<br/>" + ("Theo tư vấn / Follows advice" if item.follows_advice
                                else "Không theo tư vấn / Does not follow advice")
        rows.append([Paragraph(label, st["body"]), Paragraph(_t(item.text), st["body"]),
                     Paragraph(_t(who), st["body"]), Paragraph(_when(item.recorded_at), st["body"])])
    return out + [_grid(rows, [35 * mm, 80 * mm, 30 * mm, 35 * mm])]


def _thread(record: ConsultRecord, st: dict[str, ParagraphStyle],
            render_pin: PinRenderer | None) -> list[Flowable]:
    out: list[Flowable] = [Paragraph("8. Trao đổi / Discussion thread", st["h2"])]
    for msg, author in record.messages:
        if msg.kind == "event":
            out.append(Paragraph(f"— {escape(STATE_LABELS.get(msg.body, msg.body))} · {escape(author)} · "
                                 f"{_when(msg.created_at)}", st["event"]))
            continue
        block: list[Flowable] = [Paragraph(f"<b>{escape(author)}</b> · {_when(msg.created_at)}", st["body"])]
        if msg.body:
            block.append(Paragraph(_t(msg.body), st["body"]))
        if msg.pin_instance_uid:
            block += _pin_block(msg, st, render_pin)
        block.append(Spacer(1, 2.5 * mm))
        out.append(KeepTogether(block))
    return out


def _pin_block(msg: ConsultMessage, st: dict[str, ParagraphStyle], render_pin: PinRenderer | None) -> list[Flowable]:
    vp = msg.pin_viewport or {}
    described = (f"Ảnh ghim / Pinned image: series {escape(msg.pin_series_uid or '')}, instance "
                 f"{escape(msg.pin_instance_uid or '')}, frame {msg.pin_frame or 1}; "
                 f"W/L {vp.get('ww', '—')}/{vp.get('wc', '—')}, zoom {vp.get('zoom', 1)}; "
                 f"{len(msg.pin_annotations or [])} chú thích / annotations")
    image = render_pin(msg) if render_pin else None
    out: list[Flowable] = []
    if image is not None:
        out.append(_pdf_image(image, 110 * mm, 110 * mm))
    else:
        out.append(Paragraph("(không hiển thị được ảnh / image could not be rendered)", st["small"]))
    out.append(Paragraph(described, st["small"]))
    return out


def _versions(record: ConsultRecord, st: dict[str, ParagraphStyle]) -> list[Flowable]:
    out: list[Flowable] = [Paragraph("9. Các phiên bản kết luận / Conclusion versions", st["h2"])]
    if not record.conclusions:
        return out + [Paragraph("Chưa có / None.", st["body"])]
    for c in record.conclusions:
        title = f"Phiên bản / Version {c.version} — {escape(c.signer_name)}, {_when(c.signed_at)}"
        if c.amends_fk:
            title += f" (sửa đổi phiên bản / amends version {c.version - 1})"
        block: list[Flowable] = [Paragraph(title, st["h3"])]
        answers = _answers(c)
        block.append(_grid([["#", "Câu hỏi / Question", "Trả lời / Answer"]] + [
            [str(pos), Paragraph(_t(text), st["body"]), Paragraph(_t(answers.get(pos, "")), st["body"])]
            for pos, text in record.questions], [8 * mm, 72 * mm, 100 * mm]))
        block += _conclusion_body(c, st)
        out += block
    return out


def _reviews(record: ConsultRecord, st: dict[str, ParagraphStyle]) -> list[Flowable]:
    out: list[Flowable] = [Paragraph("10. Ai đã xem gì và khi nào / Who viewed what and when", st["h2"])]
    if not record.reviews:
        return out + [Paragraph("Chưa có ghi nhận đọc phim / No review recorded.", st["body"])]
    totals: dict[str, tuple[int, int, int]] = {}
    for r in record.reviews:
        n, ms, lossy = totals.get(r.reader, (0, 0, 0))
        totals[r.reader] = (n + 1, ms + r.duration_ms, lossy + (r.quality == "lossy"))
    out.append(_grid([["Người đọc / Reader", "Số lần hiển thị / Displays", "Tổng thời gian / Total time",
                       "Ảnh nén mất dữ liệu / Lossy"]] + [
        [Paragraph(_t(who), st["body"]), str(n), f"{ms / 1000:.1f} s", str(lossy)]
        for who, (n, ms, lossy) in totals.items()], [60 * mm, 40 * mm, 40 * mm, 40 * mm]))
    out.append(Spacer(1, 2 * mm))
    rows: list[list[Any]] = [["Người đọc / Reader", "Ảnh / Image (series · instance · frame)", "W/L",
                              "Chất lượng / Quality", "Bắt đầu / Start", "Thời lượng / Duration"]]
    for r in record.reviews[:MAX_REVIEW_ROWS]:
        rows.append([Paragraph(_t(r.reader), st["small"]),
                     Paragraph(_t(f"…{r.series_uid[-12:]} · …{r.instance_uid[-14:]} · {r.frame}"), st["small"]),
                     Paragraph(_t(r.window), st["small"]),
                     Paragraph("đầy đủ / full" if r.quality == "full" else "nén / lossy", st["small"]),
                     Paragraph(_when(r.started_at), st["small"]), Paragraph(f"{r.duration_ms / 1000:.1f} s", st["small"])])
    out.append(_grid(rows, [30 * mm, 50 * mm, 20 * mm, 22 * mm, 38 * mm, 20 * mm]))
    if len(record.reviews) > MAX_REVIEW_ROWS:
        out.append(Paragraph(f"… {len(record.reviews) - MAX_REVIEW_ROWS} dòng nữa / more rows "
                             "(xem nhật ký / see the audit log)", st["small"]))
    return out
