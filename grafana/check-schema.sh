#!/bin/sh
# Type-check grafana/dashboard.json against Grafana's own dashboard types (npm @grafana/schema)
# with the TypeScript compiler: unknown fields and wrong types fail. Installs into .cache/.
# Usage: grafana/check-schema.sh [FILE]   (from the repository root; needs node and npm;
# FILE defaults to grafana/dashboard.json)
set -eu
file=${1:-grafana/dashboard.json}
dir=.cache/grafana-schema
mkdir -p "$dir"
[ -d "$dir/node_modules/@grafana/schema" ] && [ -d "$dir/node_modules/typescript" ] ||
	(cd "$dir" && npm install --silent --no-audit --no-fund --no-save \
		typescript@7.0.2 @grafana/schema@13.2.3 >/dev/null)
{
	printf 'import type { Dashboard } from "@grafana/schema";\nexport const d: Dashboard = '
	cat "$file"
	printf ';\n'
} >"$dir/check.ts"
cat >"$dir/tsconfig.json" <<'JSON'
{"compilerOptions": {"strict": true, "noEmit": true, "moduleResolution": "bundler",
  "module": "esnext", "target": "es2022", "skipLibCheck": true}, "files": ["check.ts"]}
JSON
cd "$dir" && ./node_modules/.bin/tsc -p . && echo "$file: schema OK"
