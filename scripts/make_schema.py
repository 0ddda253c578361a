"""Write `.cog/openapi_schema.json` from the runner's signature, as `cog build` would.

coglet (the server inside the image) validates every request against this file and refuses bad
inputs with 422 before `run()` is called; without it, it validates nothing. The Cog CLI writes it
during `cog build`; this script produces the same document without Docker, so that the tests and
the demo serve exactly what the image serves. tests/test_predict.py checks the file is current.

    python scripts/make_schema.py           # rewrite the file
    python scripts/make_schema.py --check   # exit 1 if the file is out of date
"""

import argparse
import ast
import importlib.util
import inspect
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF = "predict.py:Runner"
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"


def _number(value: float | None) -> int | float | None:
    """ge/le as written: 1 stays 1, not 1.0."""
    return int(value) if value is not None and float(value).is_integer() else value


def _is_streaming(source: Path, class_name: str, method: str) -> bool:
    """True if `method` of `class_name` carries the `@streaming` / `@cog.streaming` decorator.

    The decorator is a no-op at run time; Cog reads it from the source, and so do we.
    """
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == method:
                    names = {d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", None)
                             for d in item.decorator_list}
                    return "streaming" in names
    return False


def _input_schema(info, method) -> dict:
    from cog._adt import Repetition
    from cog.input import FieldInfo

    params = inspect.signature(method).parameters
    properties, required = {}, []
    for name, field in sorted(info.inputs.items(), key=lambda kv: kv[1].order):
        prop = {"title": name.replace("_", " ").title(), **field.type.json_type(), "x-order": field.order}
        nullable = field.type.repetition in (Repetition.OPTIONAL, Repetition.OPTIONAL_REPEATED)
        if field.default is not None:
            prop["default"] = field.default
        elif not nullable:
            required.append(name)
        if nullable:
            prop["nullable"] = True
        if field.description:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = _number(field.ge)
        if field.le is not None:
            prop["maximum"] = _number(field.le)
        for key, attr in (("minLength", "min_length"), ("maxLength", "max_length"), ("pattern", "regex")):
            if getattr(field, attr) is not None:
                prop[key] = getattr(field, attr)
        if field.choices:
            prop["enum"] = list(field.choices)
        if field.deprecated:
            prop["deprecated"] = True
        declared = params[name].default
        if isinstance(declared, FieldInfo) and declared.accept:  # cog's inspector drops `accept`
            prop["x-cog-accept"] = declared.accept
        properties[name] = dict(sorted(prop.items()))
    schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def ref_to(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(name: str) -> dict:
    return {"application/json": {"schema": ref_to(name)}}


def string(title: str, **extra: str) -> dict:
    return {"title": title, "type": "string", **extra}


def build_schema(ref: str = REF) -> dict:
    """The OpenAPI 3.0.2 document coglet serves at /openapi.json for the runner `ref`."""
    from cog._inspector import create_predictor

    file_name, class_name = ref.split(":")
    module_name = Path(file_name).stem
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(module_name, ROOT / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # a deprecated Cog API fails here
        info = create_predictor(module_name, class_name)
    runner = getattr(module, class_name)

    any_json = {"application/json": {"schema": {}}}
    validation_error = {"description": "Validation Error", "content": json_body("HTTPValidationError")}
    predict = {
        "summary": "Predict",
        "description": "Run a single prediction on the model",
        "operationId": "predict_predictions_post",
        "requestBody": {"content": json_body("PredictionRequest")},
        "responses": {
            "200": {"description": "Successful Response", "content": json_body("PredictionResponse")},
            "422": validation_error,
        },
    }
    if _is_streaming(ROOT / file_name, class_name, "run"):
        predict["x-cog-streaming"] = True
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/": {"get": {"summary": "Root", "operationId": "root__get",
                          "responses": {"200": {"description": "Successful Response", "content": any_json}}}},
            "/health-check": {"get": {
                "summary": "Healthcheck", "operationId": "healthcheck_health_check_get",
                "responses": {"200": {"description": "Successful Response", "content": any_json}}}},
            "/predictions": {"post": predict},
            "/predictions/{prediction_id}/cancel": {"post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [{"required": True, "schema": string("Prediction Id"),
                                "name": "prediction_id", "in": "path"}],
                "responses": {"200": {"description": "Successful Response", "content": any_json},
                              "422": validation_error}}},
        },
        "components": {"schemas": {
            "Input": _input_schema(info, runner.run),
            "Output": info.output.json_type(),
            "PredictionRequest": {"title": "PredictionRequest", "type": "object", "properties": {
                "id": string("Id"), "input": ref_to("Input")}},
            "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": {
                "input": ref_to("Input"),
                "output": ref_to("Output"),
                "id": string("Id"),
                "version": string("Version"),
                "created_at": string("Created At", format="date-time"),
                "started_at": string("Started At", format="date-time"),
                "completed_at": string("Completed At", format="date-time"),
                "status": string("Status"),
                "error": string("Error"),
                "logs": string("Logs"),
                "metrics": {"title": "Metrics", "type": "object"},
            }},
            "Status": {"title": "Status", "description": "An enumeration.", "type": "string",
                       "enum": ["starting", "processing", "succeeded", "canceled", "failed"]},
            "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {
                "detail": {"title": "Detail", "type": "array", "items": ref_to("ValidationError")}}},
            "ValidationError": {
                "title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"title": "Location", "type": "array",
                            "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": string("Message"),
                    "type": string("Error Type"),
                }},
        }},
    }


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check that the file is up to date")
    args = parser.parse_args()
    text = render(build_schema())
    current = SCHEMA_PATH.read_text() if SCHEMA_PATH.is_file() else None
    if args.check:
        if current != text:
            print(f"{SCHEMA_PATH.relative_to(ROOT)} is out of date: run python scripts/make_schema.py")
            return 1
        print(f"{SCHEMA_PATH.relative_to(ROOT)} is up to date")
        return 0
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
