"""/v1/corpora: upload (JSON Lines as the raw body, validated as it streams in), list, show,
delete. Unlearning jobs name a corpus by id or name (`corpus_id`, `retain_corpus_id`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.auth import Editor, Reader
from app.api.corpus_upload import CONTENT_TYPES, EXAMPLE, read_corpus
from app.api.deps import SessionDep, SettingsDep
from app.api.schemas import CorpusList, CorpusPublic
from app.store import crud
from app.store.errors import DuplicateCorpusName

router = APIRouter(prefix="/v1/corpora", tags=["corpora"])


_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "JSON Lines: one document a line, "
        '`{"text", "harmful_spans"?: [[start, end], ...], "id"?, "meta"?}` or a bare string; '
        "blank lines are skipped",
        "content": {
            media_type: {"schema": {"type": "string"}, "example": EXAMPLE}
            for media_type in CONTENT_TYPES
        },
    }
}
IdOrName = Annotated[str, Path(description="a corpus id or name")]


@router.post(
    "",
    status_code=201,
    dependencies=[Editor],
    response_model=CorpusPublic,
    openapi_extra=_UPLOAD_BODY,
    responses={
        409: {"description": "a corpus of that name exists"},
        413: {"description": "larger than DETOX_CORPUS_MAX_BYTES"},
        422: {"description": "a bad line (named in `param`), or no document at all"},
    },
)
async def upload_corpus(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    name: Annotated[
        str | None,
        Query(max_length=64, description="a unique name to refer to the corpus by (optional)"),
    ] = None,
) -> CorpusPublic:
    """Store a corpus. The body is validated line by line as it arrives; nothing is stored
    unless every line is valid."""
    if name is not None:
        crud.check_corpus_name(name)
        if await run_in_threadpool(crud.corpus_name_exists, session=session, name=name):
            raise DuplicateCorpusName(name)  # before reading the body
    documents = await read_corpus(request, max_bytes=settings.corpus_max_bytes)
    corpus = await run_in_threadpool(
        crud.create_corpus, session=session, documents=documents, name=name
    )
    response.headers["Location"] = f"/v1/corpora/{corpus.id}"
    return CorpusPublic.from_row(corpus)


@router.get("", response_model=CorpusList, dependencies=[Reader])
def list_corpora(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=crud.MAX_PAGE, description="corpora to list")] = 100,
) -> CorpusList:
    """Newest first."""
    corpora = crud.list_corpora(session=session, limit=limit)
    return CorpusList(data=[CorpusPublic.from_row(c) for c in corpora])


@router.get("/{id_or_name}", response_model=CorpusPublic, dependencies=[Reader])
def get_corpus(id_or_name: IdOrName, session: SessionDep) -> CorpusPublic:
    return CorpusPublic.from_row(crud.get_corpus(session=session, id_or_name=id_or_name))


@router.delete("/{id_or_name}", status_code=204, response_class=Response, dependencies=[Editor])
def delete_corpus(id_or_name: IdOrName, session: SessionDep) -> Response:
    """Delete a corpus; refused (409) while a queued or running job uses it."""
    crud.delete_corpus(session=session, id_or_name=id_or_name)
    return Response(status_code=204)
