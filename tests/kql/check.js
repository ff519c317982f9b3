// Parse and semantically analyse KQL queries with Microsoft's Kusto.Language (npm
// @kusto/language-service-next), against the Application Insights `requests` and
// `customMetrics` tables. Used by tests/test_kql.py.
//
// stdin:  {"<id>": "<query text>", ...}
// stdout: {"<id>": {"diagnostics": [{code, severity, message, line, column, start, length}],
//                   "columns": [{name, type}] or null when the result is not a table}, ...}
// Exit 2 with a message on stderr when Kusto.Language is not installed.
'use strict';

const fs = require('fs');
const path = require('path');

const root = path.resolve(__dirname, '..', '..');
const packageDir = path.join(root, 'node_modules', '@kusto', 'language-service-next');

// The classic Application Insights schemas (the tables an Application Insights resource's Logs
// and its log alerts query), column names and types as Microsoft documents them in
// "Workspace-based resource changes" (azure-monitor/app/apm-tables.md: AppRequests <- requests,
// AppMetrics <- customMetrics). Note `success` is a string there, unlike AppRequests' bool.
const COMMON = [
  ['timestamp', 'datetime'],
  ['name', 'string'],
  ['customDimensions', 'dynamic'],
  ['operation_Name', 'string'],
  ['operation_Id', 'string'],
  ['operation_ParentId', 'string'],
  ['operation_SyntheticSource', 'string'],
  ['session_Id', 'string'],
  ['user_Id', 'string'],
  ['user_AuthenticatedId', 'string'],
  ['user_AccountId', 'string'],
  ['application_Version', 'string'],
  ['client_Type', 'string'],
  ['client_Model', 'string'],
  ['client_OS', 'string'],
  ['client_IP', 'string'],
  ['client_City', 'string'],
  ['client_StateOrProvince', 'string'],
  ['client_CountryOrRegion', 'string'],
  ['client_Browser', 'string'],
  ['cloud_RoleName', 'string'],
  ['cloud_RoleInstance', 'string'],
  ['appId', 'string'],
  ['appName', 'string'],
  ['iKey', 'string'],
  ['sdkVersion', 'string'],
  ['itemId', 'string'],
  ['itemType', 'string'],
];

const TABLES = {
  requests: [
    ['id', 'string'],
    ['source', 'string'],
    ['url', 'string'],
    ['success', 'string'],
    ['resultCode', 'string'],
    ['duration', 'real'],
    ['performanceBucket', 'string'],
    ['customMeasurements', 'dynamic'],
    ['itemCount', 'int'],
    ...COMMON,
  ],
  customMetrics: [
    ['value', 'real'],
    ['valueCount', 'int'],
    ['valueSum', 'real'],
    ['valueMin', 'real'],
    ['valueMax', 'real'],
    ['valueStdDev', 'real'],
    ...COMMON,
  ],
};

function loadKusto() {
  const files = ['bridge.js', 'Kusto.Language.Bridge.js'].map((f) => path.join(packageDir, f));
  const missing = files.filter((f) => !fs.existsSync(f));
  if (missing.length > 0) {
    process.stderr.write(
      `check.js: Microsoft's Kusto.Language is not installed: expected ${missing.join(', ')}.\n` +
        `Install the pinned test tools with \`npm ci\` in ${root} (\`make test\` does it).\n`,
    );
    process.exit(2);
  }
  // bridge.js (the Bridge.NET runtime) defines the globals Kusto.Language.Bridge.js builds on.
  files.forEach((f) => require(f));
  return global.Kusto.Language;
}

function globalState(K) {
  const S = K.Symbols;
  const tables = Object.entries(TABLES).map(([name, columns]) => {
    const schema = '(' + columns.map(([c, t]) => `${c}:${t}`).join(', ') + ')';
    return new S.TableSymbol.$ctor7(name, schema, null);
  });
  const database = new S.DatabaseSymbol.$ctor3('ApplicationInsights', null, tables, false);
  return K.GlobalState.Default.WithDatabase(database);
}

function list(items) {
  const out = [];
  for (let i = 0; i < items.Count; i++) out.push(items.getItem(i));
  return out;
}

function position(text, offset) {
  const before = text.slice(0, offset).split('\n');
  return { line: before.length, column: before[before.length - 1].length + 1 };
}

function analyse(K, globals, text) {
  const code = K.KustoCode.ParseAndAnalyze(text, globals);
  const diagnostics = list(code.GetDiagnostics()).map((d) => ({
    code: d.Code,
    severity: d.Severity,
    message: d.Message,
    ...position(text, d.Start),
    start: d.Start,
    length: d.Length,
  }));
  const result = code.ResultType;
  const columns =
    result && result.Columns
      ? list(result.Columns).map((c) => ({ name: c.Name, type: c.Type.Name }))
      : null;
  return { diagnostics, columns };
}

function main() {
  const K = loadKusto();
  const queries = JSON.parse(fs.readFileSync(0, 'utf8'));
  const globals = globalState(K);
  const report = {};
  for (const [id, text] of Object.entries(queries)) report[id] = analyse(K, globals, text);
  process.stdout.write(JSON.stringify(report, null, 1) + '\n');
}

main();
